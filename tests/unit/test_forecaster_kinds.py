"""Every forecaster kind on plain tensors: exactness where the formula promises it, safety on repeated times."""
import math
import pickle
import random

import pytest
import torch

from cache_core import FORECASTER_KINDS, ForecasterConfig, TokenGrid
from cache_core.forecasters import low_pass, split_bands
from cache_core.forecasters.polynomial import hermite

GRID = TokenGrid((4, 4), channels_first=True)


def _poly(coeffs, t):
    return sum(c * t ** k for k, c in enumerate(coeffs))


def _grid_times(n, seed):
    rng = random.Random(seed)
    return sorted((rng.uniform(0.05, 1.0) for _ in range(n)), reverse=True)  # non-uniform, decreasing


def _feed(config, times, values, grid=None):
    f = config.new_state(grid=grid)
    for t, v in zip(times, values):
        f.update(t, v)
    return f


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_adams_bashforth_of_order_k_is_exact_below_degree_k_on_non_uniform_times(k):
    times = _grid_times(k + 2, k)
    coeffs = [torch.randn(3, 4, dtype=torch.float64) for _ in range(k)]  # degree k - 1
    f = _feed(ForecasterConfig("ab", k), times, [_poly(coeffs, t) for t in times])
    for target in (0.02, times[-1] - 0.1):
        assert torch.allclose(f.predict(target), _poly(coeffs, target), atol=1e-8)


def test_adams_bashforth_of_order_k_is_not_exact_at_degree_k():
    times = [1.0, 0.7, 0.5]
    f = _feed(ForecasterConfig("ab", 2), times, [torch.tensor([t ** 2], dtype=torch.float64) for t in times])
    assert not torch.allclose(f.predict(0.2), torch.tensor([0.04], dtype=torch.float64))


def test_adams_bashforth_uses_the_published_uniform_weights():
    values = [torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([4.0])]
    f = _feed(ForecasterConfig("ab", 3), [0.6, 0.5, 0.4], values)
    assert f.predict(0.3).item() == pytest.approx(3 * 4 - 3 * 2 + 1)  # 3 F_n - 3 F_n-1 + F_n-2


@pytest.mark.parametrize("degree", [1, 2, 3, 5])
def test_chebyshev_fit_without_ridge_is_exact_below_its_degree_plus_one(degree):
    times = _grid_times(degree + 4, degree)
    coeffs = [torch.randn(2, 3, dtype=torch.float64) for _ in range(degree + 1)]
    f = _feed(ForecasterConfig("spectrum", degree=degree, ridge=0.0), times, [_poly(coeffs, t) for t in times])
    for target in (0.01, 0.5 * (times[0] + times[-1])):
        assert torch.allclose(f.predict(target), _poly(coeffs, target), atol=1e-6)


def test_chebyshev_ridge_shrinks_the_trend_but_not_the_level():
    times = [1.0, 0.8, 0.6, 0.4]
    constant = _feed(ForecasterConfig("spectrum", degree=2, ridge=10.0), times, [torch.tensor([3.0])] * 4)
    assert constant.predict(0.1).item() == pytest.approx(3.0, rel=1e-5)  # the level is not penalised
    line = [torch.tensor([t], dtype=torch.float64) for t in times]
    exact = _feed(ForecasterConfig("spectrum", degree=2, ridge=0.0), times, line).predict(0.1).item()
    ridged = _feed(ForecasterConfig("spectrum", degree=2, ridge=10.0), times, line).predict(0.1).item()
    assert exact == pytest.approx(0.1) and abs(ridged - 0.1) > 0.05


def test_spectrum_memory_is_bounded_by_its_degree():
    f = ForecasterConfig("spectrum", degree=3).new_state()
    sizes = []
    for t in _grid_times(30, 1):
        f.update(t, torch.zeros(10))
        sizes.append(f.nbytes)
    assert sizes[-1] == sizes[3] == (3 + 1 + 1) * 10 * 4


@pytest.mark.parametrize("contraction", [0.5, 1 / math.sqrt(2), 1.0])
def test_hermite_relation_to_taylor(contraction):
    """F = sum_k c_k h^k s^k H_k(s u): order 1 scales Taylor's slope by 2 s^2; order 2 on a quadratic a t^2 + ...
    adds c_2 h^2 s^2 (4 s^2 u^2 - 2) instead of c_2 (t - t_0)^2."""
    times = [0.9, 0.7, 0.45]
    a, b, c = 1.7, -0.4, 0.3
    values = [torch.tensor([a * t * t + b * t + c], dtype=torch.float64) for t in times]
    first = _feed(ForecasterConfig("hicache", 1, contraction=contraction), times, values)
    taylor = _feed(ForecasterConfig("taylor", 1), times, values)
    t = 0.3
    latest = values[-1].item()
    assert first.predict(t).item() == pytest.approx(latest + 2 * contraction ** 2 * (taylor.predict(t).item() - latest))
    second = _feed(ForecasterConfig("hicache", 2, contraction=contraction), times, values)
    t0, h = times[-1], times[-1] - times[-2]
    u = (t - t0) / h
    slope = 2 * a * t0 + b
    expected = latest + slope * h * contraction * hermite(1, contraction * u) \
        + a * h * h * contraction ** 2 * hermite(2, contraction * u)
    assert second.predict(t).item() == pytest.approx(expected)
    if contraction == 1 / math.sqrt(2):  # keeps the first-order term; the second becomes a (t - t_0)^2 - a h^2
        exact = a * t * t + b * t + c
        assert second.predict(t).item() == pytest.approx(exact - a * h * h)


def test_foca_is_exact_on_lines_and_damps_curvature():
    times = [0.8, 0.6, 0.4]
    line = _feed(ForecasterConfig("foca"), times, [torch.tensor([2 * t - 1], dtype=torch.float64) for t in times])
    assert line.predict(0.1).item() == pytest.approx(-0.8)
    square = _feed(ForecasterConfig("foca"), times, [torch.tensor([t * t], dtype=torch.float64) for t in times])
    reuse, exact = 0.16, 0.04  # one uniform step ahead: F_0 + slope term + a quarter of the quadratic term
    assert square.predict(0.2).item() == pytest.approx(0.16 - 0.16 + 0.04 / 4)
    assert abs(square.predict(0.2).item() - exact) < abs(reuse - exact)


def test_frequency_split_and_merge_is_the_identity_and_a_projection():
    x = torch.randn(2, 3, 8, 8)
    low, high = split_bands(x, TokenGrid((8, 8), channels_first=True), 0.3)
    assert torch.allclose(low + high, x, atol=1e-6)
    assert torch.allclose(low_pass(low, 0.3), low, atol=1e-5)
    assert low_pass(high, 0.3).abs().max() < 1e-5
    checker = (torch.arange(8)[:, None] + torch.arange(8)[None, :]).remainder(2).float().expand(1, 1, 8, 8) * 2 - 1
    assert low_pass(checker, 0.3).abs().max() < 1e-6  # the highest frequency is all high band
    assert torch.allclose(low_pass(torch.full((1, 1, 8, 8), 5.0), 0.1), torch.full((1, 1, 8, 8), 5.0))


def test_frequency_split_on_token_rows_keeps_text_rows_in_the_high_band():
    grid = TokenGrid((2, 3))
    tokens = torch.randn(1, 4 + 6, 5)  # 4 text rows then a 2x3 image grid
    low, high = split_bands(tokens, grid, 0.1)
    assert torch.equal(low[:, :4], torch.zeros(1, 4, 5))
    assert torch.allclose(low + high, tokens, atol=1e-6)
    image_mean = tokens[:, 4:].mean(dim=1, keepdim=True)  # cutoff 0.1 on a 2x3 grid: only the mean is low
    assert torch.allclose(low[:, 4:], image_mean.expand(1, 6, 5), atol=1e-6)


def test_freqca_reuses_the_low_band_and_forecasts_the_high_band():
    times = [0.9, 0.7, 0.5]
    base = torch.randn(1, 2, 4, 4)
    smooth = torch.ones(1, 2, 4, 4)
    values = [base + t * smooth for t in times]  # only the grid mean (low band) moves with t
    f = _feed(ForecasterConfig("freqca"), times, values, GRID)
    assert torch.allclose(f.predict(0.2), values[-1], atol=1e-5)
    moving_detail = [smooth + t * (base - base.mean(dim=(2, 3), keepdim=True)) for t in times]
    f = _feed(ForecasterConfig("freqca"), times, moving_detail, GRID)
    assert not torch.allclose(f.predict(0.2), moving_detail[-1], atol=1e-3)


def test_hyca_picks_the_best_candidate_per_feature_group():
    times = _grid_times(8, 3)
    constant, line = torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4)
    values = [torch.cat([constant + 0.01 * torch.randn(1, 2, 4, 4), line * t], dim=1) for t in times]
    f = _feed(ForecasterConfig("hyca", groups=2), times, values, GRID)
    assert f.choice is not None and f.choice[1] != "reuse"
    assert set(f.candidates) == set(f.choice)  # the others were dropped
    t = 0.01
    assert torch.allclose(f.predict(t)[:, 2:], line * t, atol=1e-4)


@pytest.mark.parametrize("kind", FORECASTER_KINDS)
def test_repeated_times_give_finite_forecasts(kind):
    """heunpp2 returns to a sigma it used two evaluations earlier: 0.97, 0.94, 0.97."""
    f = ForecasterConfig(kind).new_state(grid=GRID)
    for t in (1.0, 0.97, 0.94, 0.97, 0.94 + 1e-9, 0.9):
        f.update(t, torch.randn(1, 2, 4, 4))
        for target in (0.97, 0.94, 0.9, 0.5):
            assert torch.isfinite(f.predict(target)).all(), (kind, t, target)


@pytest.mark.parametrize("kind", FORECASTER_KINDS)
def test_every_kind_copies_keeps_dtype_and_counts_memory(kind):
    value = torch.ones(1, 2, 4, 4, dtype=torch.float16)
    f = ForecasterConfig(kind).new_state(grid=GRID)
    f.update(1.0, value)
    value.add_(5.0)
    assert torch.equal(f.latest(), torch.ones(1, 2, 4, 4, dtype=torch.float16))
    assert f.predict(0.5).dtype == torch.float16 and f.nbytes > 0


@pytest.mark.parametrize("kwargs", [dict(kind="hicache", order=0), dict(kind="ab", order=5), dict(kind="foca", order=2),
                                    dict(kind="spectrum", degree=0), dict(kind="freqca", cutoff=1.0),
                                    dict(kind="hicache", contraction=0.0), dict(kind="hyca", groups=0),
                                    dict(kind="spectrum", ridge=-1.0)])
def test_bad_settings_of_the_new_kinds_are_rejected(kwargs):
    with pytest.raises(ValueError):
        ForecasterConfig(**kwargs)


def test_configs_are_picklable_and_round_trip():
    config = ForecasterConfig("spectrum", degree=3, ridge=0.5)
    assert pickle.loads(pickle.dumps(config)) == config == ForecasterConfig.from_dict(config.to_dict())
    assert [ForecasterConfig(k).label for k in FORECASTER_KINDS] == [
        "reuse", "taylor2", "hicache", "ab2", "foca", "spectrum", "freqca", "hyca", "auto"]


def test_auto_fills_with_an_exact_forecaster_on_a_polynomial_and_with_reuse_on_noisy_steps():
    torch.manual_seed(0)
    times = _grid_times(7, 11)
    coeffs = [torch.randn(1, 2, 4, 4, dtype=torch.float64) for _ in range(3)]  # degree 2
    f = _feed(ForecasterConfig("auto"), times, [_poly(coeffs, t) for t in times])
    assert "reuse" not in f.choice
    assert torch.allclose(f.predict(0.01), _poly(coeffs, 0.01), atol=1e-6)
    level = torch.randn(1, 2, 4, 4)
    steps = [level * (1 + (i // 2)) + 0.3 * torch.randn(1, 2, 4, 4) for i in range(len(times))]
    assert set(_feed(ForecasterConfig("auto"), times, steps).choice) == {"reuse"}


def test_auto_revises_its_choice_as_the_run_changes_and_keeps_every_candidate():
    torch.manual_seed(0)  # holds for every seed of 0-59 tried
    times = [1.0 - 0.1 * i for i in range(10)]
    trend = torch.randn(1, 4, 8, 8)
    f = ForecasterConfig("auto", groups=1).new_state()
    for t in times[:5]:
        f.update(t, trend * t)  # a line: a forecast wins
    smooth_choice = set(f.choice)
    walk = trend * times[4]
    for t in times[5:]:
        walk = walk + torch.randn(1, 4, 8, 8)  # the run turns into a random walk: reuse is its best forecast
        f.update(t, walk)
    assert "reuse" not in smooth_choice and set(f.choice) == {"reuse"}
    assert len(f.candidates) == len(ForecasterConfig("auto", groups=1).new_state().candidates)


def _error(forecast, truth):
    return float((forecast - truth).pow(2).mean())


@pytest.mark.parametrize("kind, order, orders", [("taylor", 2, [0, 1, 2, 2]), ("ab", 3, [0, 1, 2, 2]),
                                                  ("foca", None, [0, 1, 1, 1]), ("hicache", 2, [0, 0, 0, 0]),
                                                  ("spectrum", None, [0, 0, 0, 0])])
def test_accuracy_order_is_the_order_the_points_so_far_allow(kind, order, orders):
    f = ForecasterConfig(kind, order).new_state()
    seen = []
    for t in (1.0, 0.8, 0.6, 0.4):
        f.update(t, torch.randn(1, 2, 4, 4))
        seen.append(f.accuracy_order)
    assert seen == orders


def test_auto_fills_near_the_last_compute_by_a_forecast_where_whole_gaps_favour_reuse():
    """A back-test spans a whole gap; rescaled to a nearer fill by each candidate's order, the choice changes."""
    torch.manual_seed(0)
    base, direction = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    def truth(t):
        return base + 0.1 * math.cos(8 * t) * direction  # small changes across a gap, but a line overshoots it
    times = [1.0, 0.8, 0.6, 0.4, 0.2]
    f = _feed(ForecasterConfig("auto", groups=1), times, [truth(t) for t in times])
    assert f.choice == ["reuse"]  # over the back-tests' distance
    assert f.predict(0.2 - f.selection.gap).equal(f.latest())  # a fill as far: reuse
    near = 0.2 - 0.05
    assert _error(f.predict(near), truth(near)) < 0.5 * _error(f.latest(), truth(near))
    assert f._best(0.05) != ["reuse"]


def test_auto_fills_near_the_last_compute_by_reuse_where_the_value_changes_much():
    """Large relative changes across a gap (a random walk with big steps): the power law is not trusted there."""
    torch.manual_seed(0)
    walk, times = torch.randn(1, 4, 8, 8), [1.0 - 0.1 * i for i in range(8)]
    f = ForecasterConfig("auto", groups=1).new_state()
    for t in times:
        walk = walk + torch.randn(1, 4, 8, 8)
        f.update(t, walk)
    for distance in (0.01, 0.05):
        assert f.predict(times[-1] - distance).equal(f.latest())


def test_auto_rescaled_choice_keeps_an_exact_forecast_on_a_polynomial_at_every_distance():
    torch.manual_seed(0)
    times = [1.0 - 0.15 * i for i in range(6)]
    coeffs = [torch.randn(1, 2, 4, 4, dtype=torch.float64) for _ in range(2)]  # a line
    f = _feed(ForecasterConfig("auto", groups=1), times, [_poly(coeffs, t) for t in times])
    for distance in (0.01, 0.05, 0.15, 0.3):
        t = times[-1] - distance
        assert torch.allclose(f.predict(t), _poly(coeffs, t), atol=1e-8), distance


@pytest.mark.parametrize("kind", ["hyca", "auto"])
def test_selections_take_one_choice_for_every_conditioning_of_a_value(kind):
    """With CFG, cond forecast and uncond reused would amplify their difference: the choice is shared."""
    times = _grid_times(6, 5)
    shared = {}
    config = ForecasterConfig(kind, groups=2)
    cond, uncond = config.new_state(grid=GRID, shared=shared), config.new_state(grid=GRID, shared=shared)
    trend, still = torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4)
    for t in times:
        cond.update(t, trend * t)  # alone it would choose a forecast
        uncond.update(t, still + 0.001 * torch.randn(1, 2, 4, 4))  # alone it would choose reuse
    assert cond.choice is not None and cond.choice == uncond.choice
    if kind == "hyca":
        assert set(cond.candidates) == set(uncond.candidates) == set(cond.choice)

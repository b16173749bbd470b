import math

import pytest
import torch

from cache_core import (DiCache, EasyCache, FirstBlock, FixedInterval, MagCache, TaylorForecaster, TeaCache,
                        calibration, make_policy)
from cache_core.calibration import MagnitudeCurve
from cache_core.policies import TEACACHE_COEFFICIENTS, polynomial, settle
from cache_core.budget import ThresholdGate


def _run(state, indicators, forced=None, gate=None):
    """What the engine does at each evaluation: measure, gate, tell the state; feed computes back."""
    gate = gate or ThresholdGate(state_threshold[0])
    decisions = []
    for i, x in enumerate(indicators):
        value = settle(state.measure(1.0 - i / len(indicators), x))
        gate.count()
        compute = bool(forced and forced[i]) or value is None or gate.wants_compute(value, i)
        gate.record(value, compute)
        state.decided(compute)
        if compute and x is not None:
            state.computed(1.0, x, x * 2, x)
        decisions.append(compute)
    return decisions


state_threshold = [None]


def _state(policy):
    """The policy's state, with the expert threshold (or budget) the gate will use."""
    state_threshold[0] = policy.effective_threshold
    return policy.new_state()


def test_fixed_interval_computes_every_nth():
    state = _state(FixedInterval(interval=3))
    assert _run(state, [None] * 9) == [True, False, False] * 3


def test_fixed_interval_restarts_after_a_forced_compute():
    state = _state(FixedInterval(interval=3))
    assert _run(state, [None] * 5, forced=[False, True, False, False, False]) == [True, True, False, False, True]


def test_speed_sets_a_budget_unless_a_threshold_is_given():
    assert FixedInterval(speed=0.0).budget == 1.0
    assert FixedInterval(speed=1.0).budget == pytest.approx(0.15)
    assert TeaCache(speed=0.3, threshold=0.2).budget is None
    assert FixedInterval(interval=3).budget is None


@pytest.mark.parametrize("cls", [TeaCache, EasyCache, FirstBlock, FixedInterval])
def test_speed_zero_always_computes(cls):
    policy = cls(speed=0.0)
    xs = [torch.full((4,), 1.0 + 0.001 * i) for i in range(10)]
    assert all(_run(policy.new_state(), xs, gate=policy.new_gate(10, 0.0)))


def test_teacache_accumulates_relative_change_until_threshold():
    state = _state(TeaCache(threshold=0.25))
    xs = [torch.full((4,), v) for v in (1.0, 1.1, 1.2, 1.3, 1.4)]
    # changes: 0.1, ~0.091, ~0.083, ~0.077 -> accumulated crosses 0.25 at the 4th
    assert _run(state, xs) == [True, False, False, True, False]


def test_teacache_rescales_with_polynomial():
    state = _state(TeaCache(threshold=0.25, coefficients=(10.0, 0.0)))  # 10 * change
    assert _run(state, [torch.full((4,), v) for v in (1.0, 1.1, 1.2)]) == [True, True, True]


def test_first_block_fills_while_probe_residual_is_close_to_last_computed():
    state = _state(FirstBlock(threshold=0.1))
    xs = [torch.full((4,), v) for v in (1.0, 1.05, 1.09, 1.2, 1.25)]
    assert _run(state, xs) == [True, False, False, True, False]


def test_easycache_needs_two_computes_before_filling():
    state = _state(EasyCache(threshold=0.5))
    xs = [torch.full((4,), 1.0 + 0.01 * i) for i in range(6)]
    decisions = _run(state, xs)
    assert decisions[:2] == [True, True] and not all(decisions)


@pytest.mark.parametrize("settings", [dict(speed=1.5), dict(start_percent=0.6, end_percent=0.5),
                                      dict(threshold=-0.1), dict(warmup_steps=-1)])
def test_bad_policy_settings_are_rejected(settings):
    with pytest.raises(ValueError):
        TeaCache(**settings)


def test_unknown_method_lists_available():
    with pytest.raises(ValueError, match="teacache"):
        make_policy("magic")


# -- DiCache -----------------------------------------------------------------------------------------
def _dicache_with_history(max_gain, probe_now):
    """Probe residuals 0 at sigma 1.0 and 1 at sigma 0.8 (computed), `probe_now` at sigma 0.6."""
    state = DiCache(max_gain=max_gain).new_state()
    _observe(state, "c", [(1.0, 0.0, True), (0.8, 1.0, True), (0.6, probe_now, False)])
    return state


def _observe(state, uuid, points):
    for sigma, probe, computed in points:
        state.observe_probe(uuid, torch.full((4,), probe))
        if computed:
            state.probe_computed(uuid, sigma)


@pytest.mark.parametrize("probe_now,max_gain,gain", [(1.3, 2.0, 1.3), (0.5, 2.0, 1.0), (3.0, 2.0, 2.0),
                                                     (3.0, 1.5, 1.5)])
def test_dicache_gain_follows_the_probe_and_is_clipped(probe_now, max_gain, gain):
    state = _dicache_with_history(max_gain, probe_now)
    assert state.gain("c") == pytest.approx(gain)
    assert state.fill_time("c", 0.6) == pytest.approx(1.0 + gain * (0.8 - 1.0))


def test_dicache_fill_is_the_aligned_residual_and_gain_one_is_reuse():
    """A linear forecast through the last two computes at the remapped time is R(k-1) + g (R(k) - R(k-1))."""
    r_before, r_last = torch.randn(3, 5), torch.randn(3, 5)
    forecaster = TaylorForecaster(1)
    forecaster.update(1.0, r_before)
    forecaster.update(0.8, r_last)
    for probe_now, max_gain in ((1.7, 2.0), (1.0, 2.0), (1.7, 1.0)):
        state = _dicache_with_history(max_gain, probe_now)
        g = state.gain("c")
        filled = forecaster.predict(state.fill_time("c", 0.6))
        torch.testing.assert_close(filled, r_before + g * (r_last - r_before))
        if g == 1.0:
            torch.testing.assert_close(filled, r_last)  # plain reuse


def test_dicache_keeps_each_conditioning_apart():
    state = _dicache_with_history(2.0, 1.5)
    _observe(state, "u", [(1.0, 0.0, True), (0.8, 2.0, True), (0.6, 2.2, False)])
    assert state.gain("c") == pytest.approx(1.5) and state.gain("u") == pytest.approx(1.1)


def test_dicache_family_defaults_and_bad_gain():
    assert DiCache().for_family("flux").max_gain == 1.5
    assert DiCache().for_family("wan").max_gain == 2.0
    assert DiCache(max_gain=1.2).for_family("wan").max_gain == 1.2
    with pytest.raises(ValueError, match="max_gain"):
        DiCache(max_gain=0.5)


def test_dicache_accumulates_the_probe_output_change():
    state = _state(DiCache(threshold=0.25))
    xs = [torch.full((4,), v) for v in (1.0, 1.1, 1.2, 1.3, 1.4)]
    assert _run(state, xs) == [True, False, False, True, False]


# -- TeaCache ----------------------------------------------------------------------------------------
def test_teacache_takes_the_published_polynomial_of_its_family_only():
    assert TeaCache().for_family("flux").coefficients == TEACACHE_COEFFICIENTS["flux"]
    assert TeaCache().for_family("wan").coefficients == ()
    assert TeaCache(coefficients=(2.0, 0.0)).for_family("flux").coefficients == (2.0, 0.0)
    # Flux: 498.65 x^4 - 283.78 x^3 + 55.86 x^2 - 3.82 x + 0.264 at x = 0.1
    expected = 498.651651e-4 - 283.781631e-3 + 55.8554382e-2 - 3.82021401e-1 + 2.64230861e-1
    assert polynomial(TEACACHE_COEFFICIENTS["flux"], 0.1) == pytest.approx(expected)


# -- MagCache ----------------------------------------------------------------------------------------
def _record(sigmas, norms):
    recorder = MagnitudeCurve.recorder()
    for sigma, norm in zip(sigmas, norms):
        recorder.add(sigma, torch.full((1, 6, 4), norm / 2.0))  # 6 tokens, channel norm = norm
    return recorder.curve()


def test_magcache_calibration_round_trips_through_its_file(tmp_path):
    sigmas = [1.0, 0.75, 0.5, 0.25, 0.1, 0.0]
    curve = _record(sigmas[:-1], [1.0, 1.2, 1.5, 1.4, 1.0])
    path = calibration.save(str(tmp_path), "abc123", "sample_euler", sigmas, curve)
    loaded, how = calibration.load(str(tmp_path), "abc123", "sample_euler", sigmas)
    assert loaded == curve and "this schedule" in how and path in how
    gammas = [MagnitudeCurve(loaded).ratio(a, b) for a, b in zip(sigmas[:-2], sigmas[1:-1])]
    assert gammas == pytest.approx([1.2, 1.25, 1.4 / 1.5, 1.0 / 1.4])


def test_magcache_calibration_interpolates_other_step_counts_and_refuses_mismatches(tmp_path):
    sigmas = [1.0 - i / 10 for i in range(10)] + [0.0]
    norms = [math.exp(-2.0 * s) for s in sigmas[:-1]]  # log norm linear in sigma: exact under interpolation
    calibration.save(str(tmp_path), "abc123", "sample_euler", sigmas, _record(sigmas[:-1], norms))
    coarse = [1.0, 0.8, 0.6, 0.4, 0.2, 0.0]
    loaded, how = calibration.load(str(tmp_path), "abc123", "sample_euler", coarse)
    assert "interpolated to 5 steps" in how
    assert MagnitudeCurve(loaded).ratio(0.8, 0.6) == pytest.approx(math.exp(0.4))
    assert calibration.load(str(tmp_path), "other-model", "sample_euler", coarse)[0] is None
    assert calibration.load(str(tmp_path), "abc123", "sample_heun", coarse)[0] is None
    far = [1.0 - i / 40 for i in range(40)] + [0.0]  # 40 steps from a 10-step curve: beyond interpolation
    missing, why = calibration.load(str(tmp_path), "abc123", "sample_euler", far)
    assert missing is None and "10 steps" in why


def test_magcache_fills_while_the_accumulated_ratio_error_is_small():
    curve = _record([1.0, 0.8, 0.6, 0.4, 0.2], [1.0, 1.01, 1.03, 1.2, 1.5])
    state = _state(MagCache(threshold=0.05, curve=curve))
    decisions = []
    for sigma in (1.0, 0.8, 0.6, 0.4, 0.2):
        value = state.measure(sigma, None)
        compute = value is None or value >= 0.05
        state.decided(compute)
        decisions.append(compute)
    # errors: 0.01, then 0.01 + |1 - 1.01*1.0198| = 0.04, then the jump to 1.2 -> compute, 1.25 -> compute
    assert decisions == [True, False, False, True, True]


def test_magcache_without_a_curve_computes_everything_and_records_one():
    state = MagCache().new_state()
    for sigma, norm in zip((1.0, 0.5, 0.1), (1.0, 2.0, 3.0)):
        assert state.measure(sigma, None) is None
        state.decided(True)
        state.computed(sigma, None, torch.zeros(1), torch.full((1, 3, 4), norm / 2.0))
    assert MagnitudeCurve(state.recorded).ratio(1.0, 0.1) == pytest.approx(3.0)


def test_with_a_budget_retention_and_max_consecutive_leave_room_for_it():
    policy = MagCache(speed=1.0)  # authors' retention 0.2, K 4
    assert policy.effective_retention(None) == 0.2 and policy.effective_max_consecutive(None) == 4
    assert policy.effective_retention(0.15) == pytest.approx(0.075)
    assert policy.effective_max_consecutive(0.15) == 13  # 1 compute in 14 evaluations is ~0.07 < 0.15
    assert policy.effective_retention(0.6) == 0.2 and policy.effective_max_consecutive(0.6) == 4
    assert TeaCache().effective_max_consecutive(0.15) == 0  # no limit stays no limit


def test_subsampled_indicator_stays_within_a_percent_of_the_full_reduction():
    """Wan-480p-like token count: features with per-token and per-channel structure, a small step change.
    The relative error of the strided relative L1 is bounded (measured 0.46%, 0.69%, 0.87% for seeds 0-2)."""
    from cache_core.policies import SUBSAMPLE_ROWS, relative_l1, subsample

    g = torch.Generator().manual_seed(0)
    tokens, dim = 32760, 64
    scale = torch.rand(tokens, 1, generator=g) * 2 + torch.rand(1, dim, generator=g)
    previous = torch.randn(1, tokens, dim, generator=g) * scale
    current = previous + 0.05 * torch.randn(1, tokens, dim, generator=g) * scale.flip(0)
    assert subsample(current).shape[0] < tokens // 4 and subsample(current).shape[0] >= SUBSAMPLE_ROWS
    full = float((current - previous).abs().mean() / previous.abs().mean())
    assert abs(float(relative_l1(current, previous)) - full) / full < 0.01
    small = previous[:, :1000]
    assert subsample(small).numel() == small.numel()  # small features are reduced whole


def test_planned_plans_from_the_schedule_and_falls_back_without_one():
    from cache_core.budget import BudgetController, PlannedGate
    schedule = (1.0, 0.9, 0.8, 0.6, 0.4, 0.0)
    policy = make_policy("planned", speed=0.6)
    gate = policy.new_gate(5, 0.0, schedule)
    assert isinstance(gate, PlannedGate) and 0 in gate.plan and len(gate.plan) == round(5 * policy.budget)
    assert isinstance(policy.new_gate(5, 0.0), BudgetController)  # no schedule known: the controller
    assert isinstance(make_policy("planned", threshold=2.0).new_gate(5, 0.0, schedule), ThresholdGate)

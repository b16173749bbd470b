import pytest
import torch

from cache_core import EasyCache, FirstBlock, FixedInterval, TeaCache, make_policy


def _run(state, indicators, forced=None):
    decisions = []
    for i, x in enumerate(indicators):
        compute, _ = state.decide(x, bool(forced and forced[i]))
        if compute and x is not None:
            state.computed(x, x * 2)
        decisions.append(compute)
    return decisions


def test_fixed_interval_computes_every_nth():
    state = FixedInterval(interval=3).new_state()
    assert _run(state, [None] * 9) == [True, False, False] * 3


def test_fixed_interval_restarts_after_a_forced_compute():
    state = FixedInterval(interval=3).new_state()
    assert _run(state, [None] * 5, forced=[False, True, False, False, False]) == [True, True, False, False, True]


def test_speed_maps_to_interval_and_zero_never_fills():
    assert FixedInterval(speed=0.0).effective_interval == 1
    assert FixedInterval(speed=1.0).effective_interval == 6
    for cls in (TeaCache, EasyCache, FirstBlock):
        assert cls(speed=0.0).effective_threshold == 0.0


@pytest.mark.parametrize("cls", [TeaCache, EasyCache, FirstBlock, FixedInterval])
def test_speed_zero_always_computes(cls):
    state = cls(speed=0.0).new_state()
    xs = [torch.full((4,), 1.0 + 0.001 * i) for i in range(10)]
    assert all(_run(state, xs))


def test_teacache_accumulates_relative_change_until_threshold():
    state = TeaCache(threshold=0.25).new_state()
    xs = [torch.full((4,), v) for v in (1.0, 1.1, 1.2, 1.3, 1.4)]
    # changes: 0.1, ~0.091, ~0.083, ~0.077 -> accumulated crosses 0.25 at the 4th
    assert _run(state, xs) == [True, False, False, True, False]


def test_teacache_rescales_with_polynomial():
    state = TeaCache(threshold=0.25, coefficients=(10.0, 0.0)).new_state()  # 10 * change
    assert _run(state, [torch.full((4,), v) for v in (1.0, 1.1, 1.2)]) == [True, True, True]


def test_first_block_fills_while_probe_residual_is_close_to_last_computed():
    state = FirstBlock(threshold=0.1).new_state()
    xs = [torch.full((4,), v) for v in (1.0, 1.05, 1.09, 1.2, 1.25)]
    assert _run(state, xs) == [True, False, False, True, False]


def test_easycache_needs_two_computes_before_filling():
    state = EasyCache(threshold=0.5).new_state()
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

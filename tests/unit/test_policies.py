import pytest
import torch

from cache_core import EasyCache, FirstBlock, FixedInterval, TeaCache, make_policy
from cache_core.budget import BudgetController, ThresholdGate


def _run(state, indicators, forced=None, gate=None):
    """What the engine does at each evaluation: measure, gate, tell the state; feed computes back."""
    gate = gate or ThresholdGate(state_threshold[0])
    decisions = []
    for i, x in enumerate(indicators):
        value = state.measure(1.0 - i / len(indicators), x)
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

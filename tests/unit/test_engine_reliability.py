"""Engine invariants behind issue 10: conditionings that come and go, per-conditioning shapes, truthful
decisions, non-finite indicators, calls of other nodes kept apart, readable sizes."""
import math

import pytest
import torch

from cache_core import CacheConfig, CacheRun, EasyCache, FixedInterval, ForecasterConfig, Site, COMPUTED
from cache_core.engine import format_bytes
from cache_core.policies import Policy, PolicyState

SIGMAS = [1.0, 0.8, 0.62, 0.45, 0.3, 0.18, 0.08, 0.0]


def model_call(run, uuids, sigma, x):
    """The whole-model site as the host integration drives it; the 'model' is f(x) = 2x + uuid offset."""
    run.begin_call(list(uuids), sigma, x)
    offsets = torch.cat([torch.full_like(part, float(ord(u[0]))) for u, part in zip(uuids, x.chunk(len(uuids)))])
    if run.decide(["model"], lambda kind: run.reference_chunk(x)):
        out = 2 * x + offsets
        run.store("model", out)
        if run.reference_chunk(out) is not None:
            run.computed(run.reference_chunk(out), run.reference_chunk(out - x))
        run.mark(0, COMPUTED)
        return out
    run.mark(0, run.fill_action)
    return run.fill("model", x)


def fixed(interval=2, **settings):
    return CacheConfig(policy=FixedInterval(interval=interval, warmup_steps=0, **settings), site=Site("model"))


def test_a_conditioning_that_appears_mid_run_makes_its_evaluation_computed_and_reported_so():
    run = CacheRun(fixed(3), ["model"], SIGMAS)
    x = torch.ones(2, 4)
    for i, sigma in enumerate(SIGMAS[:-1]):
        uuids = ["neg", "a"] if i < 4 else ["neg", "b"]  # "b" is scheduled from evaluation 4 (a fill)
        model_call(run, uuids, sigma, x)
    decisions = [ev.decision for ev in run.trace.evaluations]
    assert decisions[4] == COMPUTED
    assert [ev.actions[0] == COMPUTED for ev in run.trace.evaluations] == [d == COMPUTED for d in decisions]


def test_when_the_reference_leaves_the_next_conditioning_decides_and_caching_goes_on():
    run = CacheRun(fixed(2), ["model"], SIGMAS)
    x = torch.ones(1, 4)
    outputs = [model_call(run, ["a"] if i < 3 else ["b"], s, x) for i, s in enumerate(SIGMAS[:-1])]
    decisions = [ev.decision for ev in run.trace.evaluations]
    assert decisions[3] == COMPUTED and decisions[4] != COMPUTED  # b decides from evaluation 3 on
    assert torch.equal(outputs[4], 2 * x + ord("b"))  # b's fill is b's own value, never a's


def test_each_conditioning_keeps_its_own_shape_without_resets():
    """Regional prompts: each conditioning is a separate call at its area's size."""
    run = CacheRun(fixed(2), ["model"], SIGMAS)
    full, region = torch.ones(1, 8), torch.ones(1, 3)
    for sigma in SIGMAS[:-1]:
        out_full = model_call(run, ["a"], sigma, full)
        out_region = model_call(run, ["r"], sigma, region)
        assert torch.equal(out_full, 2 * full + ord("a")) and torch.equal(out_region, 2 * region + ord("r"))
    assert not run.notes
    assert [ev.decision for ev in run.trace.evaluations].count(COMPUTED) == 4  # 7 evaluations, interval 2


def test_a_changed_shape_resets_only_that_conditionings_caches():
    run = CacheRun(fixed(2), ["model"], SIGMAS)
    model_call(run, ["a", "b"], 1.0, torch.ones(2, 4))
    model_call(run, ["a", "b"], 0.8, torch.ones(2, 5))
    assert run.trace.evaluations[1].decision == COMPUTED and "reset" in run.notes[0]


class _InfinitePolicy(Policy):
    method = "infinite"

    def new_state(self):
        class State(PolicyState):
            def measure(self, sigma, indicator):
                return math.inf  # a rate over a vanishing change
        return State()


def test_a_non_finite_indicator_computes_and_says_so():
    config = CacheConfig(policy=_InfinitePolicy(warmup_steps=0), site=Site("model"))
    run = CacheRun(config, ["model"], SIGMAS)
    for sigma in SIGMAS[:3]:
        model_call(run, ["a"], sigma, torch.ones(1, 4))
    assert all(ev.decision == COMPUTED for ev in run.trace.evaluations)
    assert len(run.notes) == 1 and "not finite" in run.notes[0]


def test_easycache_rate_stays_finite_when_the_input_does_not_move():
    """A solver that returns to an earlier sigma can repeat an input: no infinite or NaN rate."""
    config = CacheConfig(policy=EasyCache(threshold=0.5, warmup_steps=0), site=Site("model"),
                         forecaster=ForecasterConfig("taylor", 1))
    run = CacheRun(config, ["model"], SIGMAS)
    x = torch.ones(1, 4)
    for sigma, scale in zip([1.0, 0.8, 0.8, 0.62, 0.45], [1.0, 1.0 + 1e-30, 1.0, 1.1, 1.2]):
        model_call(run, ["a"], sigma, x * scale)
    values = [ev.indicator for ev in run.trace.evaluations if ev.indicator is not None]
    assert all(math.isfinite(v) for v in values)
    rate = run.policy_state.rate
    assert rate is None or math.isfinite(rate)


def test_calls_of_another_nodes_pass_are_counted_and_explained_once():
    run = CacheRun(fixed(2), ["model"], SIGMAS)
    model_call(run, ["a"], 1.0, torch.ones(1, 4))
    run.stand_aside("guidance pass ran uncached")
    run.stand_aside("guidance pass ran uncached")
    report = run.report()
    assert report["calls_stood_aside"] == 2 and report["trace"]["evaluations"][0]["aside"] == 2
    assert report["notes"] == ["guidance pass ran uncached"]


@pytest.mark.parametrize("size, text", [(100, "100 B"), (20 * 1024, "20 KiB"), (3.5 * 2**20, "3.5 MiB"),
                                        (2**31, "2 GiB")])
def test_sizes_are_readable_at_every_scale(size, text):
    assert format_bytes(size) == text


def test_budget_note_of_a_small_cache_is_not_zero_mib():
    config = CacheConfig(policy=FixedInterval(interval=2, warmup_steps=0), site=Site("model"), memory_budget_mb=0.001)
    run = CacheRun(config, ["model"], SIGMAS)
    model_call(run, ["a"], 1.0, torch.ones(1, 1024))
    assert "0.0 MiB" not in run.notes[0] and "KiB" in run.notes[0]


def test_two_chunks_with_one_uuid_keep_two_caches():
    """The host gives a regional prompt and the negative's copy of its area one uuid: never one cache for both."""
    run = CacheRun(fixed(2), ["model"], SIGMAS)
    x = torch.tensor([[1.0], [5.0]])
    outputs = []
    for sigma in SIGMAS[:2]:
        run.begin_call(["r", "r"], sigma, x)
        if run.decide(["model"], lambda kind: run.reference_chunk(x)):
            run.store("model", x * 2)
            outputs.append(x * 2)
        else:
            outputs.append(run.fill("model", x))
    assert run.trace.evaluations[1].decision != COMPUTED
    assert torch.equal(outputs[1], torch.tensor([[2.0], [10.0]]))

"""Host-device synchronisations per evaluation: at most one, where a decision needs a scalar.

On a GPU every read of a tensor's value on the host (item, tolist, bool, float, int, cpu, numpy) waits for the
device. The engine, its policies and forecasters run here on CPU tensors with those reads counted, so a read
added to the hot path shows up whatever the device."""
import contextlib
import math

import pytest
import torch

from cache_core import (BlockRunner, CacheConfig, CacheRun, DiCache, EasyCache, FirstBlock, FixedInterval,
                        ForecasterConfig, MagCache, Site, TeaCache, COMPUTED)
from cache_core.policies import relative_l1

from test_engine import LAYOUT, STREAMS, TinyDiT, _inputs

READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")


@contextlib.contextmanager
def counted_reads(run_of):
    """Counts host reads of tensor values, per evaluation index of the run `run_of()` returns (-1: outside one)."""
    counts: dict = {}

    def wrap(name):
        original = getattr(torch.Tensor, name)

        def counting(self, *args, **kwargs):
            run = run_of()
            index = run.trace.evaluations[-1].index if run is not None and run.trace.evaluations else -1
            counts[index] = counts.get(index, 0) + 1
            return original(self, *args, **kwargs)
        return original, counting

    saved = {}
    for name in READS:
        saved[name], counting = wrap(name)
        setattr(torch.Tensor, name, counting)
    try:
        yield counts
    finally:
        for name, original in saved.items():
            setattr(torch.Tensor, name, original)


def test_the_counter_sees_a_read():
    a, b = torch.ones(3), torch.zeros(3)
    with counted_reads(lambda: None) as counts:
        float(relative_l1(a, b))
        bool(a.sum() > 0)
        a.max().item()
    assert counts == {-1: 3}


FLAT_CURVE = tuple((s, 0.0) for s in (1.0, 0.5, 0.0))  # MagCache ratios of 1: fills until max consecutive
POLICIES = {
    "fixed": lambda: FixedInterval(speed=0.5),
    "teacache": lambda: TeaCache(speed=0.5, warmup_steps=1),
    "easycache": lambda: EasyCache(speed=0.5, warmup_steps=1),
    "magcache": lambda: MagCache(speed=0.5, curve=FLAT_CURVE, retention_ratio=0.0),
    "first_block": lambda: FirstBlock(speed=0.5),
    "dicache": lambda: DiCache(speed=0.5, retention_ratio=0.0),
}
FORECASTERS = [ForecasterConfig("reuse"), ForecasterConfig("taylor", 2), ForecasterConfig("hicache"),
               ForecasterConfig("ab", 2), ForecasterConfig("foca"), ForecasterConfig("spectrum")]
STEPS = [1.0 - i / 12 for i in range(12)] + [0.0]


def _sample_model_site(config, separate: bool):
    """The whole-model site as the host drives it, cond and uncond batched or in separate calls."""
    run = CacheRun(config, ["model"], STEPS)
    x = torch.randn(2, 64, 8, generator=torch.Generator().manual_seed(0))
    runs = [run]
    with counted_reads(lambda: runs[0]) as counts:
        for sigma in STEPS[:-1]:
            calls = [(["c"], x[:1]), (["u"], x[1:])] if separate else [(["c", "u"], x)]
            outs = []
            for uuids, part in calls:
                run.begin_call(uuids, sigma, part)
                if run.decide(["model"], lambda kind, part=part: run.reference_chunk(part)):
                    out = torch.tanh(part) * (1 + sigma)
                    run.store("model", out)
                    reference = run.reference_chunk(out)
                    if reference is not None:
                        run.computed(reference, reference - part)
                    run.mark(0, COMPUTED)
                else:
                    run.mark(0, run.fill_action)
                    out = run.fill("model", part)
                outs.append(out)
            x = x + 0.1 * torch.cat(outs)
    return run, counts


def _sample_span_site(config):
    run = CacheRun(config, config.site.rows(LAYOUT), STEPS)
    runner = BlockRunner(run, config.site.plan(LAYOUT), STREAMS)
    model = TinyDiT()
    img, txt = _inputs(2)
    with counted_reads(lambda: run) as counts:
        for sigma in STEPS[:-1]:
            img = img + 0.05 * model(img, txt, sigma, ["c", "u"], runner)
    return run, counts


def _check(run, counts):
    decisions = [ev.decision for ev in run.trace.evaluations]
    assert COMPUTED in decisions and any(d != COMPUTED for d in decisions), decisions  # both kinds were timed
    per_evaluation = {ev.index: counts.get(ev.index, 0) for ev in run.trace.evaluations}
    assert max(per_evaluation.values()) <= 1, per_evaluation
    assert -1 not in counts


@pytest.mark.parametrize("forecaster", FORECASTERS, ids=lambda f: f.label)
@pytest.mark.parametrize("policy", ["fixed", "teacache", "easycache", "magcache"])
@pytest.mark.parametrize("separate", [False, True], ids=["batched", "separate"])
def test_model_site_reads_the_device_at_most_once_per_evaluation(policy, forecaster, separate):
    run, counts = _sample_model_site(CacheConfig(policy=POLICIES[policy](), forecaster=forecaster), separate)
    _check(run, counts)


@pytest.mark.parametrize("forecaster", [ForecasterConfig("reuse"), ForecasterConfig("taylor", 2)],
                         ids=lambda f: f.label)
@pytest.mark.parametrize("policy", ["fixed", "teacache", "easycache", "first_block", "dicache"])
def test_span_site_reads_the_device_at_most_once_per_evaluation(policy, forecaster):
    site = Site("span", probe_blocks=1, corrector_blocks=0)
    run, counts = _sample_span_site(CacheConfig(policy=POLICIES[policy](), forecaster=forecaster, site=site))
    _check(run, counts)


def test_a_guard_that_fires_reads_nothing_more_and_reaches_the_trace():
    """An overshooting forecast is replaced on the device; the count reaches the trace at the next read."""
    config = CacheConfig(policy=FixedInterval(interval=3, warmup_steps=2), forecaster=ForecasterConfig("taylor", 1))
    run = CacheRun(config, ["model"], [1.0, 0.8, 0.6, 0.4, 0.0])
    with counted_reads(lambda: run) as counts:
        for sigma, value in ((1.0, 1.0), (0.8, 2.0)):
            run.begin_call(["c", "u"], sigma, torch.zeros(2, 3))
            assert run.decide(["model"], lambda kind: None)
            run.store("model", torch.full((2, 3), value))
        run.begin_call(["c", "u"], 0.6, torch.zeros(2, 3))
        run.forecasters[("model", "u")].fused_terms = lambda t: ([torch.full((1, 3), math.inf)], [1.0], torch.float32)
        assert not run.decide(["model"], lambda kind: None)
        assert torch.equal(run.fill("model", torch.zeros(2, 3)), torch.full((2, 3), 2.0))
    assert counts == {2: 1}  # the finiteness of the values stored at 0.8, read with the decision
    assert run.report()["guarded_fills"] == 2 and run.trace.evaluations[2].guarded == 2

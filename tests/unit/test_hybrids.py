"""Per-block decisions (Foresight, Δ-DiT), SpeCa's verified drafts and the CFG-branch cache, on plain tensors."""
import pytest
import torch

from cache_core import (CacheConfig, CacheRun, CfgBranchCache, Delta, FixedInterval, ForecasterConfig,
                        Foresight, Site, SpeCa, COMPUTED, REJECTED, REUSED, FORECAST)
from cache_core.policies import Scope
from test_engine import LAYOUT, SIGMAS, STREAMS, TinyDiT, sample


def _scope(position, count=2):
    return Scope(f"segment {position}", position, count)


def test_foresight_calibrates_a_threshold_per_segment_and_decides_each_on_its_own():
    config = CacheConfig(policy=Foresight(threshold=3.0, warmup_steps=0, calibration_steps=2), site=Site("blocks"))
    run = CacheRun(config, ["a", "b"], [1.0, 0.8, 0.6, 0.4, 0.2, 0.0])
    slow, fast = torch.ones(4), torch.ones(4)
    decisions = []
    for step, sigma in enumerate([1.0, 0.8, 0.6, 0.4]):
        run.begin_call(["c"], sigma, torch.zeros(1, 4))
        rate_slow, rate_fast = (0.01, 0.2) if step < 3 else (0.05, 0.05)  # calibration, then the same change
        slow, fast = slow * (1 + rate_slow), fast * (1 + rate_fast)
        decisions.append((run.decide([], lambda _k, v=slow: v, _scope(0)),
                          run.decide([], lambda _k, v=fast: v, _scope(1))))
    assert decisions[:3] == [(True, True)] * 3  # calibrating (two changes seen after three computes)
    # the same 5% change exceeds the slow segment's calibrated threshold (3 x 1%), not the fast one's (3 x 20%)
    assert decisions[3] == (True, False)
    assert run.trace.evaluations[3].decision == REUSED  # not every segment computed


def test_foresight_at_speed_zero_is_bit_identical():
    outs, run, _ = sample(CacheConfig(policy=Foresight(speed=0.0), site=Site("blocks")))
    plain, _, _ = sample(CacheConfig(policy=FixedInterval(interval=1), site=Site("blocks")))
    assert all(torch.equal(a, b) for a, b in zip(outs, plain))
    assert run.trace.compute_fraction() == 1.0


@pytest.mark.parametrize("count", [1, 3, 8])
def test_delta_window_moves_from_the_rear_to_the_front_and_covers_every_block(count):
    policy = Delta(speed=0.5)
    size = len(policy.window_positions(0.0, count))
    assert size == max(1, -(-count * 3 // 4))  # window 0.75 at speed 0.5
    assert list(policy.window_positions(0.0, count)) == list(range(count - size, count))  # rear first
    assert list(policy.window_positions(1.0, count)) == list(range(size))  # front last
    starts = [policy.window_positions(p / 20, count).start for p in range(21)]
    assert starts == sorted(starts, reverse=True)
    covered = set().union(*(policy.window_positions(p / 20, count) for p in range(21)))
    assert covered == set(range(count))


def test_delta_fills_rear_blocks_early_and_front_blocks_late():
    config = CacheConfig(policy=Delta(interval=2, window=0.4, warmup_steps=0), site=Site("blocks"))
    _, run, _ = sample(config)
    filled = [[r for r, a in enumerate(ev.actions) if a == REUSED] for ev in run.trace.evaluations]
    assert filled[0] == filled[2] == filled[4] == []  # the cadence: every 2nd evaluation computes every block
    # 2 of 5 blocks, the window start at (1 - progress) * 3 for progress = step / 5
    assert filled[1] == [2, 3] and filled[3] == [1, 2] and filled[5] == [0, 1], filled


def test_delta_at_speed_zero_is_bit_identical():
    outs, run, _ = sample(CacheConfig(policy=Delta(speed=0.0), site=Site("blocks")))
    plain, _, _ = sample(CacheConfig(policy=FixedInterval(interval=1), site=Site("blocks")))
    assert all(torch.equal(a, b) for a, b in zip(outs, plain))


class ConstantResidualDiT(TinyDiT):
    """Blocks add a fixed vector: every residual is the same at every step, so a reused draft is exact."""

    def _block(self, kind, i, sigma):
        def run(args):
            self.calls += 1
            return {s: args[s] + self.weights[(kind, i)][0] for s in STREAMS[kind]}
        return run


@pytest.mark.parametrize("site", [Site("blocks"), Site("span", probe_blocks=1)])
def test_speca_accepts_exact_drafts(site):
    config = CacheConfig(policy=SpeCa(threshold=1e-6, warmup_steps=0), site=site)
    outs, run, model = sample(config, model=ConstantResidualDiT())
    decisions = [ev.decision for ev in run.trace.evaluations]
    assert decisions == [COMPUTED] + [REUSED] * (len(SIGMAS) - 2)
    assert run.report()["evaluations_rejected"] == 0
    plain, _, _ = sample(CacheConfig(policy=FixedInterval(interval=1), site=site), model=ConstantResidualDiT())
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(outs, plain))
    # the verified block is counted as computed work in every drafted evaluation
    verified = site.plan(LAYOUT).decision_block
    assert all(ev.actions[verified] == COMPUTED for ev in run.trace.evaluations)
    cells = sum(len(ev.actions) for ev in run.trace.evaluations)
    computed = sum(a == COMPUTED for ev in run.trace.evaluations for a in ev.actions)
    assert run.trace.compute_fraction() == pytest.approx(computed / cells) and computed < cells


@pytest.mark.parametrize("site", [Site("blocks"), Site("span", probe_blocks=1)])
def test_speca_rejects_bad_drafts_and_computes_them(site):
    config = CacheConfig(policy=SpeCa(threshold=1e-6, warmup_steps=0), site=site,
                         forecaster=ForecasterConfig("taylor", 1))
    outs, run, _ = sample(config)
    plain, _, _ = sample(CacheConfig(policy=FixedInterval(interval=1), site=site))
    assert all(torch.equal(a, b) for a, b in zip(outs, plain))  # a rejection recomputes the whole evaluation
    assert all(ev.decision == COMPUTED for ev in run.trace.evaluations)
    rejected = [ev.index for ev in run.trace.evaluations if REJECTED in ev.actions]
    assert rejected == list(range(1, len(SIGMAS) - 1))
    assert run.report()["evaluations_rejected"] == len(rejected)
    assert run.trace.compute_fraction() == 1.0
    assert all(ev.indicator > 1e-6 for ev in run.trace.evaluations[1:])  # the verified error is traced


def test_speca_threshold_decays_across_the_schedule():
    policy = SpeCa(speed=1.0, decay=0.25)
    assert policy.threshold_at(0.0) == pytest.approx(policy.tolerance)
    assert policy.threshold_at(1.0) == pytest.approx(0.25 * policy.tolerance)


def test_speca_batched_and_separate_calls_agree():
    config = CacheConfig(policy=SpeCa(threshold=0.02, warmup_steps=0), site=Site("blocks"),
                         forecaster=ForecasterConfig("taylor", 1))
    batched, run_b, _ = sample(config)
    separate, run_s, _ = sample(config, separate=True)
    assert [(ev.decision, ev.actions) for ev in run_b.trace.evaluations] == \
        [(ev.decision, ev.actions) for ev in run_s.trace.evaluations]
    assert {FORECAST, REJECTED} & {a for ev in run_b.trace.evaluations for a in ev.actions}
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(batched, separate))


def test_cfg_fill_equals_the_real_negative_branch_when_the_difference_is_exact():
    g = torch.Generator().manual_seed(0)
    x, eps_cond, gap = (torch.randn(1, 4, 8, 8, generator=g) for _ in range(3))
    cache = CfgBranchCache(refresh=3)
    denoised = lambda sigma, eps: x - sigma * eps  # x0 from a model output (eps / velocity)
    s1, s2 = torch.full((1, 1, 1, 1), 0.9), torch.full((1, 1, 1, 1), 0.4)
    assert cache.wants_both(x, s1)
    cache.refreshed(denoised(s1, eps_cond), denoised(s1, eps_cond + gap), s1)
    assert not cache.wants_both(x, s2)
    filled = cache.fill(denoised(s2, 0.5 * eps_cond), s2)
    assert torch.allclose(filled, denoised(s2, 0.5 * eps_cond + gap), atol=1e-6)
    assert not cache.wants_both(x, s2) and cache.fill(x, s2) is not None
    assert cache.wants_both(x, s2)  # refresh interval 3: both branches again
    assert cache.wants_both(x[:, :2], s1)  # another shape: the difference does not apply


def test_the_cfg_branch_cache_makes_computes_cheaper_for_the_budget():
    assert CacheRun(CacheConfig(site=Site("model")), ["model"], SIGMAS).compute_cost == 1.0
    run = CacheRun(CacheConfig(site=Site("model"), cfg_refresh=3), ["model"], SIGMAS)
    assert run.compute_cost == pytest.approx(2 / 3)  # one compute of three runs both branches
    run.cfg_without_negative()  # cfg 1: every compute runs the whole (positive-only) batch
    assert run.compute_cost == 1.0


def test_cfg_filled_evaluations_count_half_in_the_compute_fraction():
    config = CacheConfig(policy=FixedInterval(interval=1), site=Site("model"), cfg_refresh=2)
    run = CacheRun(config, ["model"], SIGMAS)
    for i, sigma in enumerate(SIGMAS[:2]):
        run.begin_call(["c"] if i else ["c", "u"], sigma, torch.zeros(2, 3))
        run.decide(["model"], lambda _k: None)
        run.mark(0, COMPUTED)
        if i:
            run.ran_for(0.5)
    report = run.report()
    assert report["compute_fraction"] == pytest.approx(0.75)
    assert report["evaluations_partial_batch"] == 1


@pytest.mark.parametrize("make, match", [
    (lambda: CacheConfig(policy=Foresight(), site=Site("model")), "foresight.*site to 'blocks'"),
    (lambda: CacheConfig(policy=Delta(), site=Site("model")), "delta.*site to 'blocks'"),
    (lambda: CacheConfig(policy=SpeCa(), site=Site("model")), "speca.*site to 'blocks'"),
    (lambda: CacheConfig(cfg_refresh=1), "cfg_refresh"),
    (lambda: Delta(window=0.0), "window"),
    (lambda: SpeCa(decay=0.0), "decay"),
])
def test_unusable_combinations_raise_before_sampling(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_verified_drafts_refuse_token_recompute():
    from cache_core import TokenConfig
    with pytest.raises(ValueError, match="disconnect the tokens input"):
        CacheConfig(policy=SpeCa(), site=Site("blocks"), tokens=TokenConfig())

"""Per-block policies (Foresight, Δ-DiT), SpeCa and the CFG-branch cache through the real host."""
import pytest
import torch

from benchmarks.graphs import GRAPHS, with_cache
from test_caching import _BlockCallCounter, count_block_rows  # noqa: F401 (fixture)

STEPS = 6
METHODS = [("foresight", "blocks"), ("delta", "blocks"), ("speca", "blocks"), ("speca", "span")]
# Settings that fill part of a 6-step run of the random-weight fixtures (SpeCa's drafts are off by 15-60% there).
ENGAGED = {"foresight": {"threshold": 1.5}, "delta": {"speed": 0.2}, "speca": {"threshold": 0.5}}
WORK = ("computed", "rejected")


@pytest.fixture(scope="module")
def baselines(paths, run_graph):
    return {family: run_graph(make(paths, steps=STEPS))[0] for family, make in GRAPHS.items()}


def _rows_run(counters) -> dict:
    rows = {}
    for counter in counters:
        for g, n in counter.rows.items():
            rows[g] = rows.get(g, 0) + n
    return rows


@pytest.mark.parametrize("family", list(GRAPHS))
@pytest.mark.parametrize("method, site", METHODS)
def test_speed_zero_is_bit_identical(family, method, site, paths, run_graph, baselines):
    graph = with_cache(GRAPHS[family](paths, steps=STEPS), policy={"method": method, "speed": 0.0},
                       apply={"site": site}, forecaster={"order": 1})
    latent, report = run_graph(graph)
    assert torch.equal(latent, baselines[family])
    assert report["compute_fraction"] == 1.0


@pytest.mark.parametrize("family", list(GRAPHS))
@pytest.mark.parametrize("method, site", METHODS)
def test_blocks_run_exactly_what_the_trace_says(family, method, site, paths, run_graph, baselines, count_block_rows):
    policy = {"method": method, "warmup_steps": 1, **ENGAGED[method]}
    graph = with_cache(GRAPHS[family](paths, steps=STEPS), policy=policy, apply={"site": site, "probe_blocks": 1},
                       forecaster={"order": 1})
    latent, report = run_graph(graph)
    assert torch.isfinite(latent).all()
    evaluations = report["trace"]["evaluations"]
    rows = _rows_run(count_block_rows)
    for g in range(len(report["trace"]["rows"])):
        worked = sum(e["actions"][g] in WORK for e in evaluations)
        assert rows.get(g, 0) == 2 * worked, (g, rows.get(g), worked)  # cond and uncond per evaluation
    cells = sum(len(e["actions"]) for e in evaluations)
    worked = sum(a in WORK for e in evaluations for a in e["actions"])
    assert report["compute_fraction"] == pytest.approx(worked / cells)
    assert report["compute_fraction"] < 1.0
    if method != "speca":  # per-block decisions: some evaluation computes some cached blocks and fills others
        assert any("computed" in e["actions"][1:] and e["decision"] != "computed" for e in evaluations)


@pytest.mark.parametrize("family", list(GRAPHS))
def test_cfg_branch_cache_halves_the_batch_on_its_filled_steps(family, paths, run_graph, baselines, count_block_rows):
    graph = with_cache(GRAPHS[family](paths, steps=STEPS), policy={"method": "fixed", "speed": 0.0},
                       apply={"site": "model", "cfg_cache": True, "cfg_refresh": 2})
    latent, report = run_graph(graph)
    assert torch.isfinite(latent).all() and not torch.equal(latent, baselines[family])
    shares = [e["share"] for e in report["trace"]["evaluations"]]
    assert shares == [1.0, 0.5] * (STEPS // 2)
    assert report["evaluations_partial_batch"] == STEPS // 2
    assert report["compute_fraction"] == pytest.approx(0.75)
    rows = _rows_run(count_block_rows)
    assert set(rows.values()) == {int(sum(2 * s for s in shares))}  # every block: 2 rows, 1 on filled steps
    assert not report["notes"]


def test_cfg_branch_cache_with_feature_cache_fills(paths, run_graph):
    """Only computed evaluations count toward a refresh. Where the feature cache fills the positive branch, the
    negative is that fill plus the difference: nothing runs, even though the negative's own cache predates the
    positive's last compute (a compute that ran the positive alone). A refresh that falls due on a filled
    evaluation waits for the next computed one."""
    policy = {"method": "fixed", "threshold": 2.0, "warmup_steps": 0}
    graph = with_cache(GRAPHS["wan"](paths, steps=STEPS), policy=policy, forecaster={"method": "reuse", "order": 0},
                       apply={"site": "model", "cfg_cache": True, "cfg_refresh": 3})
    latent, report = run_graph(graph)
    evaluations = report["trace"]["evaluations"]
    assert [e["decision"] for e in evaluations] == ["computed", "reused"] * 3
    assert [e["share"] for e in evaluations] == [1.0, 1.0, 0.5, 1.0, 0.5, 1.0]
    assert report["compute_fraction"] == pytest.approx(2.0 / STEPS)
    assert torch.isfinite(latent).all()


def test_cfg_branch_cache_at_cfg_1_does_nothing_and_says_so(paths, run_graph):
    plain = GRAPHS["wan"](paths, steps=STEPS, cfg=1.0)
    reference, _ = run_graph(plain)
    latent, report = run_graph(with_cache(plain, policy={"method": "fixed", "speed": 0.0},
                                          apply={"site": "model", "cfg_cache": True, "cfg_refresh": 2}))
    assert torch.equal(latent, reference)
    assert any("cfg 1" in note for note in report["notes"])
    # with a budget, computes are whole evaluations there: planned computes round(6 x 0.32) = 2 of 6 steps
    _, report = run_graph(with_cache(plain, policy={"method": "planned", "speed": 0.6},
                                     apply={"site": "model", "cfg_cache": True, "cfg_refresh": 3}))
    assert report["compute_fraction"] == pytest.approx(2 / STEPS)


def test_per_block_policy_on_the_model_site_is_refused_before_sampling(paths, host):
    graph = with_cache(GRAPHS["wan"](paths, steps=STEPS), policy={"method": "foresight"}, apply={"site": "model"})
    with pytest.raises(Exception, match="Feature cache: the 'foresight' policy decides per block"):
        host.execute(graph)

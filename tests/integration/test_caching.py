"""Feature caching in the real host: graphs run through ComfyUI's own validator and executor."""
import pytest
import torch

from benchmarks.graphs import GRAPHS, with_cache

SITES = ["model", "span", "blocks"]
STEPS = 6


@pytest.fixture(scope="module")
def baselines(paths, run_graph):
    """Uncached output of each family's graph (same seed) — computed once."""
    return {family: run_graph(make(paths, steps=STEPS))[0] for family, make in GRAPHS.items()}


@pytest.mark.parametrize("family", list(GRAPHS))
@pytest.mark.parametrize("site", SITES)
def test_speed_zero_is_bit_identical_to_the_graph_without_the_node(family, site, paths, run_graph, baselines):
    graph = with_cache(GRAPHS[family](paths, steps=STEPS), policy={"speed": 0.0}, apply={"site": site},
                       forecaster={"order": 2})
    latent, report = run_graph(graph)
    assert torch.equal(latent, baselines[family])
    assert report["evaluations"] == STEPS and report["evaluations_computed"] == STEPS


class _BlockCallCounter:
    """Counts batch rows through each transformer block with temporary forward hooks (test instrumentation)."""

    def __init__(self, diffusion_model_class):
        self.rows: dict = {}
        self.handles = []
        self.cls = diffusion_model_class

    def attach(self, module):
        names = ("double_blocks", "single_blocks", "blocks")
        blocks = [b for n in names if hasattr(module, n) for b in getattr(module, n)]
        for g, block in enumerate(blocks):
            self.handles.append(block.register_forward_hook(self._hook(g), with_kwargs=True))

    def _hook(self, g):
        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs.get("img", kwargs.get("x"))
            self.rows[g] = self.rows.get(g, 0) + x.shape[0]
        return hook

    def detach(self):
        for h in self.handles:
            h.remove()


@pytest.fixture
def count_block_rows(monkeypatch):
    """Attach forward-hook counters to every diffusion model built during the test, detach afterwards."""
    import comfy.model_patcher
    counters = []
    original = comfy.model_patcher.ModelPatcher.patch_model

    def patched(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        counter = _BlockCallCounter(type(self.model.diffusion_model))
        counter.attach(self.model.diffusion_model)
        counters.append(counter)
        return result
    monkeypatch.setattr(comfy.model_patcher.ModelPatcher, "patch_model", patched)
    yield counters
    for c in counters:
        c.detach()


@pytest.mark.parametrize("family", list(GRAPHS))
@pytest.mark.parametrize("site", ["span", "blocks"])
def test_fixed_interval_computes_exactly_what_the_trace_says(family, site, paths, run_graph, count_block_rows):
    interval = 3
    graph = with_cache(GRAPHS[family](paths, steps=STEPS), apply={"site": site, "probe_blocks": 1},
                       policy={"method": "fixed", "threshold": float(interval), "warmup_steps": 0})
    _, report = run_graph(graph)
    evaluations = report["trace"]["evaluations"]
    computed = [e["index"] for e in evaluations if e["decision"] == "computed"]
    assert computed == list(range(0, STEPS, interval))
    assert len(computed) < STEPS
    # every block ran exactly for the evaluations the trace marks computed (2 conds per evaluation)
    rows = {}
    for counter in count_block_rows:
        for g, n in counter.rows.items():
            rows[g] = rows.get(g, 0) + n
    for g in range(len(report["trace"]["rows"])):
        marked = sum(e["actions"][g] == "computed" for e in evaluations)
        assert rows.get(g, 0) == 2 * marked, (g, rows.get(g), marked)
    assert report["compute_fraction"] < 1.0 and report["ideal_speedup"] > 1.0


@pytest.mark.parametrize("family", list(GRAPHS))
def test_whole_model_site_fixed_interval(family, paths, run_graph, baselines):
    graph = with_cache(GRAPHS[family](paths, steps=STEPS), apply={"site": "model"},
                       policy={"method": "fixed", "threshold": 2.0, "warmup_steps": 0},
                       forecaster={"method": "reuse", "order": 0})
    latent, report = run_graph(graph)
    assert [e["decision"] for e in report["trace"]["evaluations"]] == ["computed", "reused"] * (STEPS // 2)
    assert torch.isfinite(latent).all() and not torch.equal(latent, baselines[family])


@pytest.mark.parametrize("family", list(GRAPHS))
def test_same_graph_twice_gives_identical_outputs(family, paths, run_graph):
    graph = with_cache(GRAPHS[family](paths, steps=STEPS), policy={"method": "fixed", "threshold": 2.0},
                       forecaster={"order": 1}, apply={"site": "blocks"})
    first, report1 = run_graph(graph)
    second, report2 = run_graph(graph)
    assert torch.equal(first, second)
    assert report1["trace"] == report2["trace"]


@pytest.mark.parametrize("family", list(GRAPHS))
@pytest.mark.parametrize("policy", [{"method": "fixed", "threshold": 2.0},
                                    {"method": "teacache", "threshold": 0.3},
                                    {"method": "first_block", "threshold": 0.5},
                                    {"method": "easycache", "threshold": 0.3}])
def test_batched_and_separate_cond_uncond_calls_take_the_same_decisions(family, policy, paths, run_graph,
                                                                       monkeypatch):
    graph = with_cache(GRAPHS[family](paths, steps=STEPS), policy={**policy, "warmup_steps": 0},
                       apply={"site": "span", "probe_blocks": 1})
    batched, report_batched = run_graph(graph)
    import comfy.samplers
    refused = []

    def one_cond_per_call(c1, c2):  # the host then runs cond and uncond in separate model calls
        refused.append(c1 is not c2)
        return c1 is c2
    monkeypatch.setattr(comfy.samplers, "can_concat_cond", one_cond_per_call)
    separate, report_separate = run_graph(graph)
    assert any(refused)
    decisions = lambda r: [(e["decision"], e["actions"]) for e in r["trace"]["evaluations"]]
    assert decisions(report_batched) == decisions(report_separate)
    assert torch.allclose(batched, separate, atol=1e-4)

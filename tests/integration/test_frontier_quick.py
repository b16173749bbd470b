"""`python -m benchmarks.frontier --quick` end to end in the real host: it checks the harness (cases,
methods, another pack's nodes, any workflow, the three outputs), not the numbers."""
import json
import os
import textwrap

import pytest

from benchmarks import frontier, graphs
from benchmarks.frontier import cases as frontier_cases, methods
from benchmarks.host import REPO_ROOT

FIELDS = ("model", "case", "case_id", "method", "family", "setting", "status", "error", "compute_fraction",
          "report_fraction", "flops", "flops_uncached", "ideal_speedup", "wallclock_speedup", "efficiency", "psnr",
          "ssim", "cache_bytes", "overhead_ms_per_cached_step")

# A throwaway pack: one MODEL->MODEL node that changes nothing, one that fails.
PACK = textwrap.dedent('''
    class _Base:
        RETURN_TYPES = ("MODEL",)
        FUNCTION = "patch"
        CATEGORY = "test"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"model": ("MODEL",), "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0})}}


    class FrontierClone(_Base):
        def patch(self, model, strength):
            return (model.clone(),)


    class FrontierBroken(_Base):
        def patch(self, model, strength):
            raise RuntimeError("this node is broken on purpose")


    NODE_CLASS_MAPPINGS = {"FrontierClone": FrontierClone, "FrontierBroken": FrontierBroken}
''')


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    folder = tmp_path_factory.mktemp("packs") / "fc_frontier_test_pack"
    folder.mkdir()
    (folder / "__init__.py").write_text(PACK)
    return str(folder)


def load(out):
    for name in ("frontier.json", "frontier.md", "frontier.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    with open(os.path.join(out, "frontier.json")) as f:
        return json.load(f)


def test_quick_run(host, tmp_path):
    """The default methods, FLOP-counted compute fractions, the three outputs (wan-video: the
    --model-file test)."""
    out = str(tmp_path / "bench")
    assert frontier.main(["--quick", "--out", out, "--cases", "wan-image", "wan-image-dpm", "wan-image-unipc",
                          "flux-image", "slice"]) == 0
    records = load(out)
    for record in records:
        assert set(FIELDS) <= set(record), record
    ok = [r for r in records if r["status"] == "ok"]
    assert {r["case"] for r in ok} >= {"image, euler/simple 6", "image, dpmpp_2m/karras 5",
                                       "image, uni_pc/beta 6, cfg 4"}
    for method in frontier.DEFAULT_METHODS:
        assert any(r["method"] == method for r in ok), method
    for r in ok:
        assert 0 < r["compute_fraction"] <= 1 and r["ideal_speedup"] >= 1 and r["wallclock_speedup"] > 0
        assert r["flops"] <= r["flops_uncached"]
        assert r["psnr"] > 0 and -1 <= r["ssim"] <= 1
    assert all(r["cache_bytes"] is not None and r["report_fraction"] is not None for r in ok if r["family"] == "ours")
    slice_ours = [r for r in ok if r["case_id"] == "slice" and r["family"] == "ours"]
    assert slice_ours and all(r["overhead_ms_per_cached_step"] > 0 and r["efficiency"] > 0 for r in slice_ours)
    with open(os.path.join(out, "frontier.md")) as f:
        table = f.read()
    assert "best PSNR ≥5×" in table and "| ≥4× |" in table


def test_sweeps_scopes_and_failures(host, pack, tmp_path):
    """--set sweeps our nodes' inputs as a product; --param scoped to a node class and a case; a
    suffix the nodes do not offer and failing nodes are records with their full error."""
    out = str(tmp_path / "bench")
    assert frontier.main(["--quick", "--out", out, "--cases", "wan-image", "flux-image",
                          "--methods", "fixed+reuse@span", "fixed+reuse@span+nosuchsel0.25",
                          "--set", "apply.probe_blocks=1,2", "--set", "policy.max_consecutive=1",
                          "--pack", pack, "--node", "FrontierClone", "--node", "FrontierBroken",
                          "--param", "strength=0.5", "--param", "FrontierClone.strength@flux-image=2,3",
                          "--param", "FrontierBroken.strength@flux-image=20"]) == 0
    records = load(out)
    by = lambda method, case: [r for r in records if r["method"] == method and r["case_id"] == case]

    span = by("fixed+reuse@span", "wan-image")
    assert [r["setting"] for r in span] == [{"speed": 0.6, "apply.probe_blocks": 1, "policy.max_consecutive": 1},
                                            {"speed": 0.6, "apply.probe_blocks": 2, "policy.max_consecutive": 1}]
    assert all(r["status"] == "ok" for r in span), span
    # the probe block is computed at every evaluation: a second one raises the computed share
    assert span[0]["report_fraction"] < span[1]["report_fraction"]
    for r in span:  # at a block site the layers outside the blocks run at every evaluation
        assert r["report_fraction"] < r["compute_fraction"] < 1

    unsupported = by("fixed+reuse@span+nosuchsel0.25", "wan-image")
    assert len(unsupported) == 1 and unsupported[0]["status"] == "failed"
    assert "is not supported by this version" in unsupported[0]["error"]

    clone = "fc_frontier_test_pack:FrontierClone"
    assert [r["setting"] for r in by(clone, "wan-image")] == [{"strength": 0.5}]
    assert [r["setting"] for r in by(clone, "flux-image")] == [{"strength": 2.0}, {"strength": 3.0}]
    assert all(r["status"] == "ok" and r["compute_fraction"] == 1.0 and r["psnr"] == frontier.PSNR_CAP
               for r in by(clone, "wan-image") + by(clone, "flux-image"))

    broken = "fc_frontier_test_pack:FrontierBroken"
    (raised,), (invalid,) = by(broken, "wan-image"), by(broken, "flux-image")
    assert raised["status"] == "failed" and "broken on purpose" in raised["error"]
    # a validation error names its cause on the lines after "invalid prompt:": the record keeps them
    assert invalid["status"] == "failed" and invalid["error"].startswith("ValueError: invalid prompt:")
    assert "strength" in invalid["error"] and "bigger than max" in invalid["error"]
    with open(os.path.join(out, "frontier.md")) as f:
        table = f.read()
    assert "broken on purpose" in table and "bigger than max" in table
    assert "## Ours vs the best other pack and built-in" in table


def test_flop_fraction_agrees_with_the_report(host, paths, run_graph):
    """On a fixed schedule our report's computed cells and the FLOP count measure the same work:
    at the model site exactly; at a block site the blocks' FLOPs exactly (Wan blocks all cost the
    same), and the whole model's fraction is s + (1 - s) * report, s the share outside the blocks."""
    from benchmarks.frontier.flops import counting_flops
    plain = graphs.wan_graph(paths, size=64, steps=6, cfg=3.0)
    with counting_flops() as uncached:
        run_graph(plain)
    assert uncached.total > uncached.blocks > 0
    outside = 1 - uncached.blocks / uncached.total
    for site in ("model", "span"):
        graph = graphs.with_cache(plain, policy=dict(method="fixed", speed=0.5), apply=dict(site=site),
                                  forecaster=dict(method="reuse", order=0))
        with counting_flops() as cached:
            _, report = run_graph(graph)
        fraction = report["compute_fraction"]
        assert fraction < 1
        assert cached.blocks / uncached.blocks == pytest.approx(fraction, rel=1e-12)
        expected = fraction if site == "model" else outside + (1 - outside) * fraction
        assert cached.total / uncached.total == pytest.approx(expected, rel=1e-12)


def test_workflow_sweep(host, paths, tmp_path):
    """Any API workflow with Apply Feature Cache: fidelity from its saved images, report added."""
    graph = graphs.with_cache(graphs.wan_graph(paths, size=64, steps=6, cfg=3.0),
                              forecaster=dict(method="taylor", order=1), cache_map=False)
    del graph["capture"]
    graph["preview"] = {"class_type": "PreviewImage", "inputs": {"images": ["decode", 0]}}
    workflow = tmp_path / "workflow.json"
    workflow.write_text(json.dumps(graph))
    assert methods.workflow_method_name(host, graph) == "teacache+taylor1@span"  # what runs without --methods
    out = str(tmp_path / "bench")
    assert frontier.main(["--quick", "--out", out, "--workflow", str(workflow), "--methods", "teacache+taylor1@span",
                          "comfy:EasyCache"]) == 0
    records = load(out)
    assert {r["method"] for r in records} == {"teacache+taylor1@span", "comfy:EasyCache"}
    assert all(r["status"] == "ok" for r in records), records
    ours = next(r for r in records if r["method"] == "teacache+taylor1@span")
    assert ours["cache_bytes"] is not None and ours["latent_psnr"] is None


def test_bundled_demo_workflow(host, tmp_path):
    """workflows/demo.json (UI format, converted as the frontend queues it) loads the bundled tiny Wan by
    name; sampler flags and seeds apply to it."""
    out = str(tmp_path / "bench")
    assert frontier.main(["--quick", "--out", out, "--workflow", os.path.join(REPO_ROOT, "workflows", "demo.json"),
                          "--steps", "4", "--seeds", "3", "4", "--methods", "fixed+reuse@model"]) == 0
    (record,) = load(out)
    assert record["status"] == "ok", record["error"]
    assert record["model"] == "demo.json" and record["case"] == "workflow, steps=4" and record["samples"] == 2


def test_any_wan_checkpoint_on_any_schedule(host, paths, tmp_path):
    """--model-file / --cond-file: a Wan checkpoint from anywhere, with its label embeddings, on the
    sampler, scheduler, steps, cfg, labels and seeds given."""
    out = str(tmp_path / "bench")
    assert frontier.main(["--quick", "--out", out, "--model-file", paths["wan"], "--cond-file", paths["wan_labels"],
                          "--cases", "wan-video", "--methods", "fixed+taylor2@blocks", "comfy:LazyCache",
                          "--sampler", "uni_pc", "--scheduler", "beta", "--steps", "4", "--cfg", "4",
                          "--labels", "2", "--seeds", "5"]) == 0
    records = load(out)
    model = os.path.basename(paths["wan"])
    assert [(r["model"], r["method"], r["status"]) for r in records] == [
        (model, "fixed+taylor2@blocks", "ok"), (model, "comfy:LazyCache", "ok")]
    assert {r["case"] for r in records} == {"video 2 latent frames, uni_pc/beta 4, cfg 4"}


def test_schedule_overrides_reach_every_sample(paths):
    schedule = frontier_cases.Schedule("heun", "karras", 7, 2.5, (1, 2), (8, 9))
    models = frontier_cases.Models(dict(wan_name=paths["wan_name"], wan_labels=paths["wan_labels"]), {})
    (case, *_) = frontier_cases.tiny_cases(models, quick=True, schedule=schedule)
    assert case.samples == ["label 1 seed 8", "label 1 seed 9", "label 2 seed 8", "label 2 seed 9"]
    for graph, (label, seed) in zip(case.graphs, [(1, 8), (1, 9), (2, 8), (2, 9)]):
        sampler = graph["sampler"]["inputs"]
        assert (sampler["sampler_name"], sampler["scheduler"], sampler["steps"], sampler["cfg"], sampler["seed"]) == \
            ("heun", "karras", 7, 2.5, seed)
        assert graph["positive"]["inputs"]["label"] == label
    with pytest.raises(ValueError, match="has labels 0..2"):
        frontier_cases.tiny_cases(models, quick=True, schedule=frontier_cases.Schedule(labels=(3,)))


@pytest.mark.parametrize("argv, message", [
    (["--methods", "nosuch+reuse@span"], "unknown method 'nosuch+reuse@span'. Available: default, planned+reuse@model, "
                                        "fixed+reuse@model"),
    (["--cases", "nosuch"], "unknown case(s) nosuch; available: wan-image"),
])
def test_unknown_names_list_what_exists(host, tmp_path, argv, message):
    with pytest.raises(ValueError) as error:
        frontier.main(["--quick", "--out", str(tmp_path), *argv])
    assert message in str(error.value)


def test_unknown_pack_node_lists_the_pack_nodes(host, pack, tmp_path):
    with pytest.raises(ValueError, match="has no node 'Nope'; its nodes: FrontierBroken, FrontierClone"):
        frontier.main(["--quick", "--out", str(tmp_path), "--pack", pack, "--node", "Nope"])

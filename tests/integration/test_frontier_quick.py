"""`python -m benchmarks.frontier --quick` end to end in the real host: it checks the harness (cases,
methods, another pack's nodes, any workflow, the three outputs), not the numbers."""
import json
import os
import textwrap

import pytest

from benchmarks import frontier, graphs

FIELDS = ("model", "case", "method", "setting", "status", "error", "compute_fraction", "ideal_speedup",
          "wallclock_speedup", "efficiency", "psnr", "ssim", "cache_bytes")

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


def test_quick_run_with_another_pack(host, pack, tmp_path):
    out = str(tmp_path / "bench")
    assert frontier.main(["--quick", "--out", out, "--pack", pack, "--node", "FrontierClone",
                          "--node", "FrontierBroken", "--param", "strength=0.5,2"]) == 0
    records = load(out)
    for record in records:
        assert set(FIELDS) <= set(record), record
    ok = [r for r in records if r["status"] == "ok"]
    assert {r["case"] for r in ok} >= {"image, euler/simple 6", "image, dpmpp_2m/karras 5"}
    for method in frontier.DEFAULT_METHODS:
        assert any(r["method"] == method for r in ok), method
    for r in ok:
        assert 0 < r["compute_fraction"] <= 1 and r["ideal_speedup"] >= 1 and r["wallclock_speedup"] > 0
        assert r["psnr"] > 0 and -1 <= r["ssim"] <= 1
    assert all(r["cache_bytes"] is not None for r in ok if "@" in r["method"])
    tokens = [r for r in ok if r["method"] in ("fixed+reuse@span+toca0.25", "fixed+reuse@span+clusca0.25")]
    assert len(tokens) == 2 and all(r["partial_step_cost"] > 0 for r in tokens)  # the slice times token methods

    clone = [r for r in records if r["method"] == "fc_frontier_test_pack:FrontierClone"]
    assert clone and all(r["status"] == "ok" for r in clone)
    assert {r["setting"]["strength"] for r in clone} == {0.5, 2.0}
    assert all(r["compute_fraction"] == 1.0 and r["psnr"] == frontier.PSNR_CAP for r in clone)
    broken = [r for r in records if r["method"] == "fc_frontier_test_pack:FrontierBroken"]
    assert broken and all(r["status"] == "failed" and "broken on purpose" in r["error"] for r in broken)
    with open(os.path.join(out, "frontier.md")) as f:
        table = f.read()
    assert "best PSNR ≥5×" in table and "broken on purpose" in table


def test_workflow_sweep(host, paths, tmp_path):
    """Any API workflow with Apply Feature Cache: fidelity from its saved images, report added."""
    graph = graphs.with_cache(graphs.wan_graph(paths, size=64, steps=6, cfg=3.0), cache_map=False)
    del graph["capture"]
    graph["preview"] = {"class_type": "PreviewImage", "inputs": {"images": ["decode", 0]}}
    workflow = tmp_path / "workflow.json"
    workflow.write_text(json.dumps(graph))
    out = str(tmp_path / "bench")
    assert frontier.main(["--quick", "--out", out, "--workflow", str(workflow)]) == 0
    records = load(out)
    assert {r["method"] for r in records} == {"teacache+reuse@span", "comfy:EasyCache", "comfy:LazyCache"}
    assert all(r["status"] == "ok" for r in records), records
    ours = next(r for r in records if r["method"] == "teacache+reuse@span")
    assert ours["cache_bytes"] is not None and ours["latent_psnr"] is None


def test_any_wan_checkpoint(host, paths, tmp_path):
    """--model-file / --cond-file: a Wan checkpoint from anywhere, with its label embeddings."""
    out = str(tmp_path / "bench")
    assert frontier.main(["--quick", "--out", out, "--model-file", paths["wan"], "--cond-file", paths["wan_labels"],
                          "--cases", "wan-video", "--methods", "fixed+taylor2@blocks", "comfy:LazyCache"]) == 0
    records = load(out)
    assert [(r["model"], r["method"], r["status"]) for r in records] == [
        (os.path.basename(paths["wan"]), "fixed+taylor2@blocks", "ok"), (os.path.basename(paths["wan"]), "comfy:LazyCache", "ok")]


@pytest.mark.parametrize("argv, message", [
    (["--methods", "nosuch+reuse@span"], "unknown method 'nosuch+reuse@span'. Available: fixed+reuse@model"),
    (["--cases", "nosuch"], "unknown case(s) nosuch; available: wan-image"),
])
def test_unknown_names_list_what_exists(host, tmp_path, argv, message):
    with pytest.raises(ValueError) as error:
        frontier.main(["--quick", "--out", str(tmp_path), *argv])
    assert message in str(error.value)


def test_unknown_pack_node_lists_the_pack_nodes(host, pack, tmp_path):
    with pytest.raises(ValueError, match="has no node 'Nope'; its nodes: FrontierBroken, FrontierClone"):
        frontier.main(["--quick", "--out", str(tmp_path), "--pack", pack, "--node", "Nope"])

"""Shipped workflows: the UI-format files (what people drag into ComfyUI) and their API-format twins
(workflows/api/, for scripting) describe the same graph, and the host's own validator accepts it against
its node definitions (GET /object_info). Model files absent here are placeholder files with the
workflow's names, so only their names and types are checked. The tiny-model workflows run end to end."""
import glob
import json
import os

import pytest

from benchmarks.host import REPO_ROOT
from benchmarks.ui_workflow import NOTE_TYPES, SHIPPED, widget_default, object_info, to_api

UI_WORKFLOWS = sorted(glob.glob(os.path.join(REPO_ROOT, "workflows", "*.json")))
API_WORKFLOWS = sorted(glob.glob(os.path.join(REPO_ROOT, "workflows", "api", "*.json")))
TINY = ("demo.json", "tiny_wan_video.json", "tiny_wan_ab.json")
# Loader inputs that name model files, and the model folder each lists.
MODEL_INPUTS = {("UNETLoader", "unet_name"): "diffusion_models", ("VAELoader", "vae_name"): "vae",
                ("CLIPLoader", "clip_name"): "text_encoders", ("CheckpointLoaderSimple", "ckpt_name"): "checkpoints",
                **{("DualCLIPLoader", f"clip_name{i}"): "text_encoders" for i in (1, 2)},
                **{("TripleCLIPLoader", f"clip_name{i}"): "text_encoders" for i in (1, 2, 3)}}


def _load(path):
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def info(host):
    return object_info(host.node_classes)


@pytest.fixture(scope="module")
def placeholder_models(host, tmp_path_factory):
    """Empty files named like the workflows' models, in folders registered with the host."""
    import folder_paths
    host.add_model_dir(os.path.join(REPO_ROOT, "benchmarks", "models"))  # the tiny workflows' real model
    root = tmp_path_factory.mktemp("placeholder_models")
    for path in API_WORKFLOWS:
        for node in _load(path).values():
            for name, value in node["inputs"].items():
                kind = MODEL_INPUTS.get((node["class_type"], name))
                if kind and value not in folder_paths.get_filename_list(kind):
                    (root / kind).mkdir(exist_ok=True)
                    (root / kind / value).write_bytes(b"")
    for kind in {kind for kind in MODEL_INPUTS.values() if (root / kind).is_dir()}:
        folder_paths.add_model_folder_path(kind, str(root / kind))


def _validate(prompt):
    import asyncio
    import execution
    valid, error, _, node_errors = asyncio.run(execution.validate_prompt("test", prompt, None))
    assert valid and not node_errors, json.dumps({"error": error, "node_errors": node_errors}, indent=1)[:3000]


def test_every_ui_workflow_has_its_api_twin_and_a_family_each():
    names = {os.path.basename(p)[:-5] for p in UI_WORKFLOWS}
    assert names == {os.path.basename(p)[:-5] for p in API_WORKFLOWS} == set(SHIPPED)
    for family in ("flux", "wan21_t2v", "wan21_t2i", "wan22", "sd35", "hunyuan_video", "qwen_image", "lumina2",
                   "sdxl_deepcache", "any_model", "ab_"):
        assert any(family in name for name in names), family


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=os.path.basename)
def test_ui_workflow_converts_to_its_api_twin_and_validates_in_the_host(path, info, placeholder_models):
    workflow = _load(path)
    assert workflow["version"] >= 0.4 and workflow["groups"] and workflow["links"]
    notes = [n for n in workflow["nodes"] if n["type"] in NOTE_TYPES]
    assert notes and "speed" in notes[0]["widgets_values"][0], "a note explains the sliders"
    assert all(len(n["pos"]) == 2 and len(n["size"]) == 2 for n in workflow["nodes"])
    ids = [n["id"] for n in workflow["nodes"]]
    assert all(isinstance(i, int) for i in ids) and len(set(ids)) == len(ids)  # the frontend needs numeric ids
    prompt = to_api(workflow, info)
    assert any(n["class_type"] == "ApplyFeatureCache" for n in prompt.values())
    twin = _load(os.path.join(REPO_ROOT, "workflows", "api", os.path.basename(path)))
    assert set(prompt) == set(twin)
    for node_id, node in twin.items():  # the UI file may add optional widgets at their defaults
        converted = prompt[node_id]
        assert converted["class_type"] == node["class_type"]
        assert {k: converted["inputs"][k] for k in node["inputs"]} == node["inputs"], node_id
        spec = info[node["class_type"]]["input"]
        for name in set(converted["inputs"]) - set(node["inputs"]):
            assert name in spec.get("optional", {}), f"{node_id}: required input {name} missing from the API twin"
            assert converted["inputs"][name] == widget_default(spec["optional"][name]), f"{node_id}.{name}"
    _validate(prompt)


def test_the_converter_follows_widget_order_and_seed_control_values(info):
    """KSampler's widgets: seed, its 'control after generate' value, then steps... (the frontend's order)."""
    workflow = _load(os.path.join(REPO_ROOT, "workflows", "demo.json"))
    sampler = next(n for n in workflow["nodes"] if n["type"] == "KSampler")
    assert sampler["widgets_values"][:3] == [7, "fixed", 30]
    sampler = {**sampler, "widgets_values": [11, "randomize", 5] + sampler["widgets_values"][3:]}
    prompt = to_api({**workflow, "nodes": [sampler if n["type"] == "KSampler" else n for n in workflow["nodes"]]}, info)
    inputs = prompt[str(sampler["id"])]["inputs"]
    assert inputs["seed"] == 11 and inputs["steps"] == 5 and inputs["model"] == ["22", 0]


@pytest.mark.parametrize("name", TINY)
def test_tiny_model_ui_workflows_run(name, host, info, placeholder_models):
    outputs = host.execute(to_api(_load(os.path.join(REPO_ROOT, "workflows", name)), info))
    report = next(ui["feature_cache_report"][0] for ui in outputs.values() if "feature_cache_report" in ui)
    assert report["evaluations"] > 0 and 0 < report["compute_fraction"] <= 1
    images = [ui["images"] for ui in outputs.values() if "images" in ui]
    assert len(images) == 2  # the sample (for A/B: uncached | cached) and the map figure


def test_demo_runs_and_writes_its_outputs(host, tmp_path, capsys):
    from benchmarks import demo
    assert demo.main(["--out", str(tmp_path)]) == 0
    for name in ("cached.png", "uncached.png", "cache_map.png", "report.json"):
        assert (tmp_path / name).exists(), name
    with open(tmp_path / "report.json") as f:
        report = json.load(f)
    assert report["evaluations"] == 30 and 0 < report["compute_fraction"] <= 1
    assert "PSNR" in capsys.readouterr().out

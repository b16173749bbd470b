"""The headless host harness itself: real graphs through the host's validator and executor,
with the tiny fixture models. Everything else in tests/integration builds on these guarantees."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks import fixtures, host
from benchmarks.latent import latent_to_image


@pytest.fixture(scope="module")
def h():
    # Tiny models: one intra-op thread avoids OpenMP hand-off costs, which dominate (up to 50x)
    # on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # Only the fixture pack: the harness must not depend on the product pack.
    yield host.boot(packs=[host.FIXTURE_PACK])
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def paths(h, tmp_path_factory):
    return fixtures.ensure_fixtures(tmp_path_factory.mktemp("fixtures"))


def sampler_graph(loader, cond_path, latent, key, seed=42):
    """loader -> KSampler (4 euler steps, cfg 2) -> capture, decode, preview."""
    return {
        "1": loader,
        "2": {"class_type": "FCFixtureLabelConditioning", "inputs": {"path": cond_path, "label": 0, "guidance": 3.5}},
        "3": {"class_type": "FCFixtureLabelConditioning", "inputs": {"path": cond_path, "label": 1, "guidance": 3.5}},
        "4": latent,
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "seed": seed,
            "steps": 4, "cfg": 2.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        "6": {"class_type": "FCFixtureCapture", "inputs": {"samples": ["5", 0], "key": key}},
        "7": {"class_type": "FCFixtureDecode", "inputs": {"samples": ["5", 0]}},
        "8": {"class_type": "PreviewImage", "inputs": {"images": ["7", 0]}},
    }


def wan_graph(paths, seed=42):
    return sampler_graph(
        {"class_type": "UNETLoader", "inputs": {"unet_name": paths["wan_name"], "weight_dtype": "default"}},
        paths["wan_labels"],
        {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": 64, "height": 64, "length": 1, "batch_size": 1}},
        "wan", seed)


def flux_graph(paths, seed=42):
    return sampler_graph(
        {"class_type": "FCFixtureFluxLoader", "inputs": {"path": paths["flux"]}},
        paths["flux_labels"],
        {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "flux", seed)


def preview_images(h, outputs, node_id="8"):
    """The PNGs a PreviewImage node wrote, as float arrays [H, W, C] in [0, 1]."""
    images = []
    for item in outputs[node_id]["images"]:
        path = os.path.join(h.output_dir, item["type"], item["subfolder"], item["filename"])
        images.append(np.asarray(Image.open(path)).astype(np.float32) / 255.0)
    return images


def test_boot_is_idempotent_and_registers_nodes(h):
    assert host.boot(packs=[host.FIXTURE_PACK]) is h
    assert os.path.abspath(host.FIXTURE_PACK) in h.loaded_packs
    for name in ("EasyCache", "LazyCache", "EmptyHunyuanLatentVideo", "EmptySD3LatentImage", "ModelSamplingSD3",
                 "UNETLoader", "KSampler", "FCFixtureFluxLoader", "FCFixtureLabelConditioning", "FCFixtureDecode",
                 "FCFixtureCapture"):
        assert name in h.node_classes, name


def test_wan_via_unetloader_is_deterministic_and_recomputed(h, paths):
    h.execute(wan_graph(paths), client_id="test")
    first = h.captured("wan")
    assert first.shape == (1, 16, 1, 8, 8)
    assert torch.isfinite(first).all() and first.abs().max() > 0

    outputs = h.execute(wan_graph(paths), client_id="test")
    assert torch.equal(h.captured("wan"), first)
    # Nothing was served from the host's output cache: every node ran again.
    cached = [data for event, data, _ in h.events if event == "execution_cached"]
    assert cached and cached[0]["nodes"] == []
    ran = {data["node"] for event, data, _ in h.events if event == "executing"}
    assert ran == set(wan_graph(paths))
    steps = [data for event, data, _ in h.events if event == "progress" and data["node"] == "5"]
    assert [s["value"] for s in steps] == [1, 2, 3, 4] and steps[-1]["max"] == 4
    # One frame decodes to one RGB image equal to the exact latent map (up to PNG rounding); that map
    # is 2x (a 64x64 empty latent is 8x8, so 16x16 pixels), not a real VAE's 8x.
    (image,) = preview_images(h, outputs)
    expected = latent_to_image(first)[0, :, 0].permute(1, 2, 0).numpy()
    assert image.shape == (16, 16, 3)
    assert np.abs(image - expected).max() <= 1 / 255 + 1e-6

    h.execute(wan_graph(paths, seed=43))
    assert not torch.equal(h.captured("wan"), first)


def test_flux_via_fixture_loader(h, paths):
    outputs = h.execute(flux_graph(paths))
    first = h.captured("flux")
    assert first.shape == (1, 16, 8, 8)
    assert torch.isfinite(first).all() and first.abs().max() > 0
    (image,) = preview_images(h, outputs)
    assert image.shape == (16, 16, 3)

    h.execute(flux_graph(paths))
    assert torch.equal(h.captured("flux"), first)
    assert not any(event == "executing" for event, _, _ in h.events)  # no client_id, no per-node events


def test_decode_turns_video_frames_into_a_batch(h):
    graph = {
        "1": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": 64, "height": 32, "length": 5, "batch_size": 1}},
        "2": {"class_type": "FCFixtureDecode", "inputs": {"samples": ["1", 0]}},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}},
    }
    images = preview_images(h, h.execute(graph), "3")
    assert len(images) == 2  # 5 frames -> 2 latent frames
    assert all(image.shape == (8, 16, 3) for image in images)  # latent 4x8, decoded at 2x


def test_invalid_prompt_raises_value_error_with_host_details(h, paths):
    graph = wan_graph(paths)
    graph["5"]["inputs"]["steps"] = 0
    with pytest.raises(ValueError, match="node 5 \\(KSampler\\).*steps"):
        h.execute(graph)
    graph = wan_graph(paths)
    graph["1"]["class_type"] = "NoSuchNode"
    with pytest.raises(ValueError, match="NoSuchNode does not exist"):
        h.execute(graph)


def test_node_failure_raises_runtime_error_with_host_message(h, paths):
    graph = flux_graph(paths)
    graph["3"]["inputs"]["label"] = 99
    with pytest.raises(RuntimeError, match="node 3 \\(FCFixtureLabelConditioning\\) failed: ValueError: label 99"):
        h.execute(graph)


def test_pack_that_fails_to_load_raises(h, tmp_path):
    with pytest.raises(RuntimeError, match="has no __init__.py"):
        h.load_pack(str(tmp_path))
    (tmp_path / "__init__.py").write_text("raise ImportError('fixture pack is broken')\n")
    with pytest.raises(RuntimeError, match="failed to load(.|\n)*fixture pack is broken"):
        h.load_pack(str(tmp_path))
    assert str(tmp_path) not in h.loaded_packs


def test_fixture_files_are_byte_identical(h, paths, tmp_path):
    again = fixtures.ensure_fixtures(tmp_path)
    for name in ("wan", "wan_labels", "flux", "flux_labels"):
        with open(paths[name], "rb") as a, open(again[name], "rb") as b:
            assert a.read() == b.read(), name


def test_comfyui_path_reports_a_missing_host(monkeypatch, tmp_path):
    monkeypatch.setenv("COMFYUI_PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="ComfyUI host not found at .*set COMFYUI_PATH"):
        host.comfyui_path()

"""The nodes as a user meets them: schema, bad input, and the Cache Map outputs."""
import json
import os

import pytest
import torch

from benchmarks.graphs import flux_graph, wan_graph, with_cache

NODE_IDS = ["FeatureCachePolicy", "FeatureCacheForecaster", "FeatureCacheTokenRatio", "ApplyFeatureCache",
            "FeatureCacheMap"]


def test_every_node_is_registered_with_tooltips_on_every_input(host):
    for node_id in NODE_IDS:
        cls = host.node_classes[node_id]
        info = cls.INPUT_TYPES()
        for group in ("required", "optional"):
            for name, spec in info.get(group, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"


@pytest.mark.parametrize("policy, apply, forecaster, message", [
    ({}, {"probe_blocks": 3, "corrector_blocks": 2}, None, "probe_blocks"),
    ({"start_percent": 0.7, "end_percent": 0.3}, {}, None, "start_percent"),
    ({"method": "first_block"}, {"probe_blocks": 0}, None, "probe_blocks >= 1"),
])
def test_impossible_settings_fail_with_a_message_that_says_what_to_change(policy, apply, forecaster, message,
                                                                          host, paths):
    graph = with_cache(wan_graph(paths, steps=2), policy=policy, apply=apply, forecaster=forecaster)
    with pytest.raises(RuntimeError, match=message):
        host.execute(graph)


def test_out_of_range_order_is_rejected_by_validation(host, paths):
    graph = with_cache(wan_graph(paths, steps=2), forecaster={"order": 5})
    with pytest.raises(ValueError, match="order"):
        host.execute(graph)


def test_token_ratio_out_of_range_is_rejected_by_validation(host, paths):
    graph = with_cache(wan_graph(paths, steps=2))
    graph["tokens"] = {"class_type": "FeatureCacheTokenRatio", "inputs": {"selection": "score", "ratio": 0.0,
                                                                          "clusters": 8, "gamma": 0.01,
                                                                          "alternate": False}}
    graph["cache_apply"]["inputs"]["tokens"] = ["tokens", 0]
    with pytest.raises(ValueError, match="ratio"):
        host.execute(graph)


def test_unsupported_architecture_names_supported_families_and_the_model_site(product):
    adapters = product("nodes.adapters")

    class SomeOtherDiT(torch.nn.Module):
        pass
    with pytest.raises(ValueError) as error:
        adapters.adapter_for(SomeOtherDiT())
    assert "Flux" in str(error.value) and "Wan" in str(error.value) and "'model' site" in str(error.value)


def test_host_drift_fails_before_sampling_naming_attribute_family_and_version(product, models):
    integration, adapters, core = product("nodes.integration"), product("nodes.adapters"), product("cache_core")
    wan = models["wan"][0]
    diffusion_model = wan.model.diffusion_model
    blocks = diffusion_model._modules.pop("blocks")  # a host whose Wan class renamed its block list
    try:
        with pytest.raises(adapters.HostDrift) as error:
            integration.install(wan, core.CacheConfig(site=core.Site("span")), integration.CacheHandle())
    finally:
        diffusion_model._modules["blocks"] = blocks
    message = str(error.value)
    assert "'blocks'" in message and "Wan" in message and integration.host_version() in message
    assert integration.host_version()[0].isdigit()


def test_cache_map_returns_the_map_image_and_saves_the_report(host, paths):
    graph = with_cache(flux_graph(paths, steps=6), policy={"method": "fixed", "threshold": 2.0},
                       apply={"site": "span", "probe_blocks": 1, "corrector_blocks": 1})
    graph["map_preview"] = {"class_type": "PreviewImage", "inputs": {"images": ["cache_map", 0]}}
    outputs = host.execute(graph)
    report = outputs["cache_map"]["feature_cache_report"][0]
    summary = json.loads(outputs["cache_map"]["text"][0])
    assert summary["evaluations"] == 6 and summary["evaluations_computed"] == 3
    assert summary["ideal_speedup"] == pytest.approx(1 / report["compute_fraction"])
    rows = report["trace"]["rows"]
    assert rows[:2] == ["double_block 0", "double_block 1"] and len(rows) == 2 + 4
    image = outputs["map_preview"]["images"][0]
    assert image["filename"].endswith(".png")
    folder = os.path.join(host.output_dir, "output", "feature_cache")
    saved = sorted(f for f in os.listdir(folder) if f.endswith(".json"))
    with open(os.path.join(folder, saved[-1])) as f:
        assert json.load(f)["trace"] == report["trace"]


def test_progress_reaches_the_browser_after_every_step(host, paths):
    steps = 5
    graph = with_cache(wan_graph(paths, steps=steps), policy={"method": "fixed", "threshold": 2.0})
    outputs = host.execute(graph, client_id="browser-1")
    progress = [data for event, data, sid in host.events if event == "feature_cache.progress"]
    assert [p["step"] for p in progress] == list(range(1, steps + 1)) + [steps]
    assert all(p["node"] == "cache_apply" for p in progress) and progress[-1]["done"]
    report = outputs["cache_map"]["feature_cache_report"][0]
    letters = {"computed": "C", "reused": "R", "forecast": "F"}
    expected = ["".join(letters[a] for a in e["actions"]) for e in report["trace"]["evaluations"]]
    assert progress[-1]["columns"] == expected
    assert len(progress[2]["columns"]) == 3  # the map grows step by step


def test_the_frontend_extension_is_registered_with_the_host(host):
    import nodes
    from benchmarks.host import REPO_ROOT
    web = os.path.realpath(os.path.join(REPO_ROOT, "web"))
    assert web in {os.path.realpath(p) for p in nodes.EXTENSION_WEB_DIRS.values()}
    with open(os.path.join(web, "feature_cache.js")) as f:
        source = f.read()
    assert "feature_cache.progress" in source and "addDOMWidget" in source


def test_unet_blocks_site_and_depth_errors_say_what_works(product):
    from benchmarks import coverage
    integration, adapters, core = product("nodes.integration"), product("nodes.adapters"), product("cache_core")
    unet = coverage.build(coverage.FAMILIES["SD1.5 U-Net"])
    with pytest.raises(adapters.UnsupportedModel, match="'span' site.*or 'model'"):
        integration.install(unet, core.CacheConfig(site=core.Site("blocks", probe_blocks=1)), integration.CacheHandle())
    with pytest.raises(ValueError, match="between 1 and"):
        integration.install(unet, core.CacheConfig(site=core.Site("span", probe_blocks=0)), integration.CacheHandle())

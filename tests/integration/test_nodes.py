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


def test_cache_map_returns_a_figure_and_saves_the_report(host, paths):
    graph = with_cache(flux_graph(paths, steps=6), policy={"method": "fixed", "threshold": 2.0},
                       apply={"site": "span", "probe_blocks": 1, "corrector_blocks": 1})
    graph["map_preview"] = {"class_type": "PreviewImage", "inputs": {"images": ["cache_map", 0]}}
    outputs = host.execute(graph)
    report = outputs["cache_map"]["feature_cache_report"][0]
    summary = json.loads(outputs["cache_map"]["text"][0])
    assert summary["evaluations"] == 6 and summary["evaluations_computed"] == 3 and summary["elapsed_s"] > 0
    assert summary["ideal_speedup"] == pytest.approx(1 / report["compute_fraction"])
    rows = report["trace"]["rows"]
    assert rows[:2] == ["double_block 0", "double_block 1"] and len(rows) == 2 + 4
    image = outputs["map_preview"]["images"][0]
    assert image["filename"].endswith(".png")
    folder = os.path.join(host.output_dir, "output", "feature_cache")
    saved = sorted(f for f in os.listdir(folder) if f.endswith(".json"))
    with open(os.path.join(folder, saved[-1])) as f:
        assert json.load(f)["trace"] == report["trace"]
    state = outputs["cache_map"]["feature_cache_map"][0]  # what the widget redraws from
    assert state["header"]["rows"] == rows and len(state["columns"]) == 6


def test_saved_map_is_a_figure_with_the_cells_axes_and_legend(product):
    """The figure holds one block of the action's colour per trace cell, plus text around the grid."""
    import numpy as np
    figure, progress = product("nodes.figure"), product("nodes.progress")
    actions = ["computed", "reused", "forecast", "partial"]
    rows = [f"double_block {i}" for i in range(3)]
    evaluations = [{"index": c, "sigma": 1 - c / 30, "step": c, "decision": "computed", "indicator": 0.1,
                    "actions": [actions[(c + r) % 4] for r in range(3)]} for c in range(30)]
    report = {"method": "fixed", "threshold": 2.0, "forecaster": "reuse", "site": "blocks", "compute_fraction": 0.25,
              "ideal_speedup": 4.0, "evaluations": 30, "evaluations_computed": 8, "peak_cache_bytes": 2**20,
              "elapsed_s": 1.5, "cells": {a: 0 for a in actions}, "trace": {"rows": rows, "evaluations": evaluations}}
    cell = 8
    image = figure.render_figure(report, cell)
    assert image.dtype == np.uint8 and image.shape[2] == 3
    assert image.shape[1] >= figure.MIN_WIDTH and image.shape[0] > 3 * 14 + 60  # room for title, axes, legend
    colors = {e["action"]: tuple(int(e["color"][i:i + 2], 16) for i in (1, 3, 5)) for e in progress.legend()}
    # Find the grid: the first cell (computed) starts one pixel before its first pure pixel (thin separators).
    ys, xs = np.nonzero((image == colors["computed"]).all(axis=2))
    top = ys.min() - 1
    left = xs[ys == ys.min()].min() - 1  # the legend's swatch has the same colour further down
    ch = figure.row_height(3, cell)
    assert ch >= 14  # every row of a small map gets its label
    for c in range(30):
        for r in range(3):
            centre = image[top + r * ch + ch // 2, left + c * cell + cell // 2]
            assert tuple(centre) == colors[evaluations[c]["actions"][r]], (c, r)
    text_pixels = (image < 100).all(axis=2)  # dark ink: labels, ticks and title
    assert text_pixels[:, :left].any() and text_pixels[top + 3 * ch:].any() and text_pixels[:top].any()


def test_progress_reaches_the_browser_that_queued_the_prompt_incrementally(host, paths, product):
    progress = product("nodes.progress")
    steps = 5
    graph = with_cache(wan_graph(paths, steps=steps), policy={"method": "fixed", "threshold": 2.0})
    outputs = host.execute(graph, client_id="browser-1")
    events = [(data, sid) for event, data, sid in host.events if event == progress.PROGRESS_EVENT]
    assert events and all(sid == "browser-1" and data["node"] == "cache_apply" for data, sid in events)
    messages = [data for data, _ in events]
    final = messages[-1]
    assert final["done"] and final["full"] and [m["done"] for m in messages].count(True) == 1
    report = outputs["cache_map"]["feature_cache_report"][0]
    codes = {e["action"]: e["code"] for e in final["header"]["legend"]}
    expected = ["".join(codes[a] for a in e["actions"]) for e in report["trace"]["evaluations"]]
    assert final["columns"] == expected and final["header"]["rows"] == report["trace"]["rows"]
    # Incremental: the live messages tile the evaluations without resending any.
    live = messages[:-1]
    assert live and live[0]["start"] == 0 and "header" in live[0]
    covered = 0
    for m in live:
        assert m["start"] == covered and ("header" in m) == (m is live[0])
        covered += len(m["columns"])
    assert 0 < covered <= len(expected) and sum((m["columns"] for m in live), []) == expected[:covered]


def test_progress_stream_throttles_and_caps_event_size(product):
    """A 1000-block, 50-step run: a handful of size-capped events, then the full state once."""
    import torch
    progress, cache_core = product("nodes.progress"), product("cache_core")
    rows = [f"double_block {i}" for i in range(1000)]
    run = cache_core.CacheRun(cache_core.CacheConfig(), rows, [1 - i / 50 for i in range(51)])

    class Server:
        client_id = "artist"
        sent = []

        def send_sync(self, event, data, sid):
            self.sent.append((event, json.loads(json.dumps(data, allow_nan=False)), sid))

    now = [0.0]
    server = Server()
    stream = progress.ProgressStream(run, "12:7:5", server, clock=lambda: now[0], max_events_per_s=4,
                                     max_cells=20000)
    for step in range(50):
        run.begin_call(["u"], 1 - step / 50, torch.zeros(1, 4))
        for r in range(1000):
            run.mark(r, "computed" if step % 3 == 0 else "reused")
        now[0] += 0.05  # 20 steps a second
        stream.step(step + 1, 50)
    stream.finish({**run.report(), "elapsed_s": 2.5}, 50)
    live = [data for _, data, _ in server.sent[:-1]]
    assert all(sid == "artist" and data["node"] == "12:7:5" for _, data, sid in server.sent)
    assert len(live) <= 2.5 * 4 + 1  # 2.5 s of sampling at most 4 events a second
    assert all(len(m["columns"]) * 1000 <= 20000 for m in live)
    final = server.sent[-1][1]
    assert final["full"] and len(final["columns"]) == 50 and all(len(c) == 1000 for c in final["columns"])
    assert final["summary"]["elapsed_s"] == 2.5


def test_no_progress_without_a_client_or_node_id(product):
    progress, cache_core = product("nodes.progress"), product("cache_core")
    run = cache_core.CacheRun(cache_core.CacheConfig(), ["model"], [1.0, 0.0])

    class Server:
        client_id = None

        def send_sync(self, *args):
            raise AssertionError("nothing should be sent")

    stream = progress.ProgressStream(run, "5", Server())
    stream.step(1, 1)
    stream.finish(run.report(), 1)
    assert progress.with_progress(None, stream) is None


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

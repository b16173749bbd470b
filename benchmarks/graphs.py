"""API-format graphs for the tiny fixture models, with or without the feature-cache nodes.

Shared by the integration tests, the demo and the benchmark so they all run the same graphs.
"""
from __future__ import annotations

import copy

POLICY_DEFAULTS = dict(method="teacache", speed=0.5, start_percent=0.0, end_percent=1.0, warmup_steps=1,
                       max_consecutive=0, threshold=-1.0)
APPLY_DEFAULTS = dict(site="span", probe_blocks=1, corrector_blocks=0, cache_device="compute", memory_budget_mb=0.0)
FORECASTER_DEFAULTS = dict(method="taylor", order=2)
SAMPLER_DEFAULTS = dict(seed=1, steps=8, cfg=2.0, sampler_name="euler", scheduler="simple", denoise=1.0)


def _sampler_graph(model_node: dict, labels: str, latent_node: dict, label: int, negative_label: int,
                   capture_key: str, sampler: dict) -> dict:
    return {
        "model": model_node,
        "positive": {"class_type": "FCFixtureLabelConditioning", "inputs": {"path": labels, "label": label, "guidance": 3.5}},
        "negative": {"class_type": "FCFixtureLabelConditioning",
                     "inputs": {"path": labels, "label": negative_label, "guidance": 3.5}},
        "latent": latent_node,
        "sampler": {"class_type": "KSampler", "inputs": {
            "model": ["model", 0], "positive": ["positive", 0], "negative": ["negative", 0],
            "latent_image": ["latent", 0], **SAMPLER_DEFAULTS, **sampler}},
        "decode": {"class_type": "FCFixtureDecode", "inputs": {"samples": ["sampler", 0]}},
        "capture": {"class_type": "FCFixtureCapture", "inputs": {"samples": ["sampler", 0], "key": capture_key}},
    }


def wan_graph(paths: dict, label=0, negative_label=1, size=64, frames=1, capture_key="out", **sampler) -> dict:
    """Tiny Wan through the host's UNETLoader; `frames` latent frames (1 = an image)."""
    model = {"class_type": "UNETLoader", "inputs": {"unet_name": paths["wan_name"], "weight_dtype": "default"}}
    latent = {"class_type": "EmptyHunyuanLatentVideo",
              "inputs": {"width": size, "height": size, "length": 4 * (frames - 1) + 1, "batch_size": 1}}
    return _sampler_graph(model, paths["wan_labels"], latent, label, negative_label, capture_key, sampler)


def flux_graph(paths: dict, label=0, negative_label=1, size=64, capture_key="out", **sampler) -> dict:
    """Tiny Flux built in-process by the fixture loader node."""
    model = {"class_type": "FCFixtureFluxLoader", "inputs": {"path": paths["flux"]}}
    latent = {"class_type": "EmptySD3LatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}}
    return _sampler_graph(model, paths["flux_labels"], latent, label, negative_label, capture_key, sampler)


GRAPHS = {"wan": wan_graph, "flux": flux_graph}


def with_cache(graph: dict, policy: dict | None = None, apply: dict | None = None, forecaster: dict | None = None,
               cache_map: bool = True) -> dict:
    """The same graph with Cache Policy (+ Forecaster) -> Apply Feature Cache between model and sampler."""
    graph = copy.deepcopy(graph)
    graph["cache_policy"] = {"class_type": "FeatureCachePolicy", "inputs": {**POLICY_DEFAULTS, **(policy or {})}}
    graph["cache_apply"] = {"class_type": "ApplyFeatureCache", "inputs": {
        "model": ["model", 0], "policy": ["cache_policy", 0], **APPLY_DEFAULTS, **(apply or {})}}
    if forecaster is not None:
        graph["cache_forecaster"] = {"class_type": "FeatureCacheForecaster",
                                     "inputs": {**FORECASTER_DEFAULTS, **forecaster}}
        graph["cache_apply"]["inputs"]["forecaster"] = ["cache_forecaster", 0]
    graph["sampler"]["inputs"]["model"] = ["cache_apply", 0]
    if cache_map:
        graph["cache_map"] = {"class_type": "FeatureCacheMap", "inputs": {
            "model": ["cache_apply", 0], "samples": ["sampler", 0], "cell_size": 8, "filename_prefix": "feature_cache/map"}}
    return graph


CACHE_NODE_TYPES = ("FeatureCachePolicy", "FeatureCacheForecaster", "FeatureCacheTokenRatio", "ApplyFeatureCache",
                    "FeatureCacheMap")


def without_cache(graph: dict) -> dict:
    """The graph as if the cache nodes had never been added: the model's consumers are wired to Apply's model
    input, and nodes that only showed the cache's outputs are dropped."""
    graph = copy.deepcopy(graph)
    sources = {nid: node["inputs"]["model"] for nid, node in graph.items() if node["class_type"] == "ApplyFeatureCache"}
    removed = {nid for nid, node in graph.items() if node["class_type"] in CACHE_NODE_TYPES}
    while True:  # also what only consumed them (a preview of the cache map)
        more = {nid for nid, node in graph.items() if nid not in removed and any(
            isinstance(v, list) and len(v) == 2 and v[0] in removed and v[0] not in sources
            for v in node["inputs"].values())}
        if not more:
            break
        removed |= more
    graph = {nid: node for nid, node in graph.items() if nid not in removed}
    for node in graph.values():
        for name, value in node["inputs"].items():
            if isinstance(value, list) and len(value) == 2 and value[0] in sources:
                node["inputs"][name] = list(sources[value[0]])
    return graph


def resolve_paths(graph: dict, root: str) -> dict:
    """Make the fixture nodes' relative file paths absolute (shared workflows name files relative to the repo)."""
    import os
    graph = copy.deepcopy(graph)
    for node in graph.values():
        path = node["inputs"].get("path")
        if node["class_type"].startswith("FCFixture") and isinstance(path, str) and not os.path.isabs(path):
            node["inputs"]["path"] = os.path.join(root, path)
    return graph

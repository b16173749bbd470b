"""UI-format workflows (what the ComfyUI frontend saves, loads and people share) <-> API-format prompts.

`to_api` does what the frontend does when it queues a workflow: widget values are matched to the
node's inputs in the order `/object_info` lists them (a seed's "control after generate" value
follows it), links become [source id, output slot], notes are dropped. `to_ui` lays an API prompt out
as a UI workflow with positions, groups and notes; `python -m benchmarks.ui_workflow` regenerates
the shipped UI workflows from workflows/api/.
"""
from __future__ import annotations

import json
import os
import uuid

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
NOTE_TYPES = {"Note", "MarkdownNote"}
MUTED, BYPASSED = 2, 4


def object_info(node_classes: dict) -> dict:
    """What GET /object_info answers, for the given classes (the host's own V1 description when it has one)."""
    out = {}
    for name, cls in node_classes.items():
        if hasattr(cls, "GET_NODE_INFO_V1"):
            out[name] = cls.GET_NODE_INFO_V1()
            continue
        inputs = cls.INPUT_TYPES()
        out[name] = {"input": inputs, "input_order": {k: list(v) for k, v in inputs.items()},
                     "output": list(cls.RETURN_TYPES),
                     "output_name": list(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES))}
    return out


def _inputs(info: dict):
    """(name, spec, is_widget, has_control) in the frontend's widget order: required, then optional."""
    for group in ("required", "optional"):
        for name in info.get("input_order", {}).get(group, []):
            spec = info["input"][group][name]
            kind, options = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
            widget = (isinstance(kind, list) or kind in WIDGET_TYPES) and not options.get("forceInput")
            control = widget and (options.get("control_after_generate") or name in ("seed", "noise_seed"))
            yield name, spec, widget, bool(control)


def _type_name(spec) -> str:
    return "COMBO" if isinstance(spec[0], list) else spec[0]


_MISSING = object()


def widget_default(spec):
    """A widget's default as the frontend sets it: the declared default, else a combo's first option."""
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if options.get("default") is not None:
        return options["default"]
    choices = spec[0] if isinstance(spec[0], list) else options.get("options", [])
    return choices[0] if choices else None


def to_api(workflow: dict, info: dict) -> dict:
    """The API prompt the frontend would queue for a (flat, subgraph-free) UI workflow."""
    if workflow.get("definitions", {}).get("subgraphs"):
        raise ValueError("workflows with subgraphs are not converted here; the frontend flattens them")
    links = {link[0]: (str(link[1]), link[2]) for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in NOTE_TYPES or node.get("mode", 0) == MUTED:
            continue
        if node.get("mode", 0) == BYPASSED:
            raise ValueError(f"node {node['id']} is bypassed; shipped workflows keep every node active")
        if node["type"] not in info:
            raise ValueError(f"node {node['id']}: unknown node type {node['type']}")
        linked = {slot["name"]: links[slot["link"]] for slot in node.get("inputs", []) if slot.get("link") is not None}
        values = iter(node.get("widgets_values") or [])
        inputs = {}
        for name, spec, widget, control in _inputs(info[node["type"]]):
            if widget:
                value = next(values, _MISSING)
                if value is _MISSING:  # saved before the node gained this input: the frontend uses its default
                    value = widget_default(spec)
                    if value is None:
                        raise ValueError(f"node {node['id']} ({node['type']}): no widget value for '{name}'")
                inputs[name] = value
                if control:
                    next(values, None)
            if name in linked:
                inputs[name] = list(linked[name])
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def _depths(graph: dict) -> dict:
    depth = {}

    def visit(nid):
        if nid not in depth:
            depth[nid] = 0
            sources = [v[0] for v in graph[nid]["inputs"].values() if isinstance(v, list)]
            depth[nid] = 1 + max((visit(s) for s in sources), default=-1)
        return depth[nid]
    for nid in graph:
        visit(nid)
    return depth


# Sizes that show every widget; the cache map nodes get room for the map.
NODE_SIZES = {"ApplyFeatureCache": (460, 520), "FeatureCacheMap": (480, 460), "FeatureCachePolicy": (320, 250),
              "SaveImage": (360, 380), "PreviewImage": (360, 320), "SaveAnimatedWEBP": (360, 420)}


def to_ui(graph: dict, info: dict, notes: list | None = None, groups: list | None = None) -> dict:
    """A UI workflow of an API prompt: numeric ids, laid out left to right by dependency depth.

    notes: [(title, text, [x, y], [w, h])]; groups: [(title, [api node ids])] boxed around those nodes."""
    ids = {nid: int(nid) if str(nid).isdigit() else i + 1 for i, nid in enumerate(graph)}
    if len(set(ids.values())) != len(ids):
        ids = {nid: i + 1 for i, nid in enumerate(graph)}
    depth = _depths(graph)
    sizes = {}
    for nid, node in graph.items():
        width, height = NODE_SIZES.get(node["class_type"], (320, 0))
        slots = list(_inputs(info[node["class_type"]]))
        sizes[nid] = (width, height or 46 + 24 * (len(slots) + sum(c for *_, c in slots)))
    column_x, x = {}, 40
    for d in range(max(depth.values()) + 1):  # each column as wide as its widest node
        column_x[d] = x
        x += max((sizes[n][0] for n in graph if depth[n] == d), default=0) + 60
    column_y: dict = {}
    nodes, links = [], []
    positions = {}
    for nid in sorted(graph, key=lambda n: (depth[n], ids[n])):
        width, height = sizes[nid]
        y = column_y.get(depth[nid], 60)
        column_y[depth[nid]] = y + height + 60
        positions[nid] = (column_x[depth[nid]], y, width, height)
    outputs = {nid: [[] for _ in info[graph[nid]["class_type"]]["output"]] for nid in graph}
    link_of = {}
    for nid, node in graph.items():
        for name, value in node["inputs"].items():
            if isinstance(value, list):
                link = [len(links) + 1, ids[value[0]], value[1], ids[nid], None, None]  # slot and type below
                links.append(link)
                link_of[(nid, name)] = link
                outputs[value[0]][value[1]].append(link[0])
    for order, nid in enumerate(sorted(graph, key=lambda n: (depth[n], ids[n]))):
        node = graph[nid]
        node_info = info[node["class_type"]]
        slots, values = [], []
        for name, spec, widget, control in _inputs(node_info):
            value = node["inputs"].get(name)
            linked = isinstance(value, list)
            if widget:
                values.append(widget_default(spec) if linked or value is None else value)
                if control:
                    values.append("fixed")
            if not widget or linked:
                slot = {"name": name, "type": _type_name(spec), "link": None}
                if widget:
                    slot["widget"] = {"name": name}
                if linked:
                    link = link_of[(nid, name)]
                    link[4], link[5] = len(slots), _type_name(spec)
                    slot["link"] = link[0]
                slots.append(slot)
        x, y, w, h = positions[nid]
        nodes.append({
            "id": ids[nid], "type": node["class_type"], "pos": [x, y], "size": [w, h], "flags": {}, "order": order,
            "mode": 0, "inputs": slots,
            "outputs": [{"name": name, "type": kind, "links": outputs[nid][i] or None, "slot_index": i}
                        for i, (name, kind) in enumerate(zip(node_info["output_name"], node_info["output"]))],
            "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": values,
        })
    next_id = max(ids.values()) + 1
    for title, text, pos, size in notes or []:
        nodes.append({"id": next_id, "type": "Note", "title": title, "pos": list(pos), "size": list(size), "flags": {},
                      "order": len(nodes), "mode": 0, "inputs": [], "outputs": [], "properties": {},
                      "widgets_values": [text], "color": "#432", "bgcolor": "#653"})
        next_id += 1
    ui_groups = []
    for i, (title, members) in enumerate(groups or []):
        boxes = [positions[m] for m in members]
        left, top = min(b[0] for b in boxes) - 20, min(b[1] for b in boxes) - 60
        right, bottom = max(b[0] + b[2] for b in boxes) + 20, max(b[1] + b[3] for b in boxes) + 20
        ui_groups.append({"id": i + 1, "title": title, "bounding": [left, top, right - left, bottom - top],
                          "color": "#3f789e", "font_size": 24, "flags": {}})
    return {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, json.dumps(graph, sort_keys=True))), "revision": 0,
            "last_node_id": next_id - 1, "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": ui_groups, "config": {}, "extra": {"ds": {"scale": 0.75, "offset": [0, 0]}}, "version": 0.4}


SLIDERS_NOTE = """Feature cache: the model is computed only at some steps; the others are filled from a cache.

Cache Policy - when to compute.
  method: default (the recommended one), fixed interval, planned, teacache, easycache, first_block, dicache,
    magcache, foresight, delta, speca (hover the input for what each does; some need a block site).
  speed: 0 computes every step (identical output), 1 is the fastest. Start near 0.3-0.5 and raise it
    while the result still looks right.
  start_percent / end_percent: the part of the schedule where caching may happen.
  warmup_steps: first evaluations always computed. max_consecutive: at most this many filled in a row (0: no limit).
  threshold: -1 derives it from speed; set it to use the method's own threshold.
Cache Forecaster - how a skipped step is filled: reuse (last value), taylor, hicache, ab, foca, spectrum, freqca,
  hyca (forecast along sigma), auto (back-tests the candidates at every computed step; the least recent error fills).
Cache Token Ratio (optional, span and blocks sites) - on filled steps a ratio of the image/video tokens is
  recomputed and the rest filled: score (ToCa), cluster (ClusCa), random; alternate (DuCa).
Apply Feature Cache - where: model (whole model, any architecture), span (blocks between the probe and corrector
  blocks as one residual), blocks (each block). cache_device cpu keeps caches in RAM; memory_budget_mb caps them.
Cache Map - while sampling, Apply Feature Cache shows the step x block map live: hover a cell for its step, sigma,
  block, action and the policy's indicator vs threshold; +/- or ctrl+wheel zoom. After sampling, Cache Map outputs the
  figure and the report (also saved under output/feature_cache/)."""

# UI workflow name (its API twin: workflows/api/NAME.json) -> what the note says about it
SHIPPED = {
    "flux_t2i_teacache_taylor": "Flux dev, block span: TeaCache + Taylor order 2.",
    "wan21_t2v_first_block": "Wan 2.1 T2V 1.3B video, block span: first-block (DBCache) probe.",
    "wan21_t2v_tokens_clusca": "Wan 2.1 T2V 1.3B video, block span, fixed interval + reuse with token-level "
                               "recompute (Cache Token Ratio, ClusCa: 10% of the video tokens recomputed on every "
                               "filled step, their update shared within 16 clusters). Measured on the tiny models "
                               "only (README: Token-level recompute).",
    "wan21_t2i_teacache": "Wan 2.1 as an image model (one frame), block span: TeaCache + Taylor 1.",
    "wan22_ti2v_5b_teacache": "Wan 2.2 TI2V 5B video, block span: TeaCache + Taylor 2.",
    "sd35_t2i_first_block": "SD3.5, block span: first-block (DBCache) probe + Taylor 1.",
    "hunyuan_video_t2v_first_block": "HunyuanVideo, block span: first-block (DBCache) probe + Taylor 2.",
    "qwen_image_t2i_first_block": "Qwen-Image, block span: first-block (DBCache) probe + Taylor 1.",
    "lumina2_t2i_first_block": "Lumina 2, block span: first-block (DBCache) probe + Taylor 1.",
    "sdxl_deepcache": "SDXL U-Net, DeepCache: the span site keeps probe_blocks shallow blocks on each side and "
                      "computes the deep branch every other step (fixed interval), reuse.",
    "any_model_easycache_sdxl": "The whole-model site works on any model (here SDXL): EasyCache + Taylor 1.",
    "ab_flux_uncached_vs_cached": "A/B: the same seed uncached (left) and cached (right), stitched side by side, "
                                  "with the cache map. Change the cache settings and compare.",
    "demo": "The bundled tiny trained Wan (make demo): runs on CPU in a second. The fixture nodes come from "
            "benchmarks/fixture_nodes (tests and demos only).",
    "tiny_wan_video": "The bundled tiny Wan, 4-frame video, per-block site (tests and demos).",
    "tiny_wan_ab": "A/B on the bundled tiny Wan: uncached (left) and cached (right) side by side (tests and demos).",
}
CACHE_TYPES = ("FeatureCachePolicy", "FeatureCacheForecaster", "FeatureCacheTokenRatio", "ApplyFeatureCache",
               "FeatureCacheMap")


def shipped_ui(name: str, info: dict, root: str) -> dict:
    with open(os.path.join(root, "workflows", "api", name + ".json")) as f:
        graph = json.load(f)
    cache = [nid for nid, node in graph.items() if node["class_type"] in CACHE_TYPES]
    return to_ui(graph, info, notes=[("How the feature cache sliders work", SHIPPED[name] + "\n\n" + SLIDERS_NOTE,
                                      [40, -560], [760, 480])],
                 groups=[("Feature cache", cache)])


def main() -> int:
    """Regenerates workflows/*.json (UI format) from workflows/api/*.json through the host's node definitions."""
    from benchmarks import host as host_module
    host = host_module.boot()
    info = object_info(host.node_classes)
    for name in SHIPPED:
        with open(os.path.join(host_module.REPO_ROOT, "workflows", name + ".json"), "w") as f:
            json.dump(shipped_ui(name, info, host_module.REPO_ROOT), f, indent=1)
    print(f"wrote {len(SHIPPED)} UI workflows to workflows/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

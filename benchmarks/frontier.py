"""`make bench`: the fidelity / speed frontier of every caching method, through the real host's sampler.

For each case (benchmarks/frontier_cases.py) every method is swept over its setting; each cached run
is compared with the uncached run of the same graph and seed. Methods: ours, named
"policy+forecaster@site" (e.g. teacache+taylor2@span, swept over `speed`); the host's built-in
EasyCache / LazyCache as comfy:EasyCache / comfy:LazyCache (swept over reuse_threshold); and any
other pack's MODEL->MODEL node as PACK:NodeClass (--pack/--node/--param).

Measures (design note 5):
- compute_fraction: ours from the run report (full-equivalent block evaluations / total); the
  host's nodes from their "skipped X/Y steps" log line; other packs from counting the transformer
  block calls (torch forward hooks) of one run against the uncached run. ideal_speedup = 1 / it.
- wallclock_speedup: median sampler time of interleaved uncached runs / of the cached runs, in one
  process. The sampler time comes from the host's progress hook, which the sampler calls after
  every step: it excludes graph validation, model loading and decoding, which caching does not
  change. The first step ends before the first call; it is computed by every method, and is
  counted at the uncached per-step time. efficiency = wallclock_speedup / ideal_speedup.
- psnr / ssim of the decoded output (latent_psnr of the final latent), mean over the samples;
  identical outputs count as PSNR_CAP dB. cache_bytes: the peak bytes our caches held.
A setting that fails is recorded with status "failed" and its error; the run goes on.
Writes frontier.json (records), frontier.md (tables) and frontier.png (PSNR vs ideal speedup).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import itertools
import json
import logging
import math
import os
import re
import statistics
import sys
import time
from typing import Callable

import numpy as np
import torch
from PIL import Image

from benchmarks import frontier_cases, graphs, host as host_module
from benchmarks.latent import frames
from benchmarks.metrics import psnr, ssim

REPO_ROOT = host_module.REPO_ROOT
PSNR_CAP = 100.0
SPEEDS = (0.25, 0.5, 0.75, 1.0)  # fixed: compute every 2nd, 3rd, 5th, 6th step
QUICK_SPEEDS = (0.6,)
SLICE_SPEEDS = (0.5,)  # fixed interval 3
# reuse_threshold sweeps spanning each built-in node's range on the tiny models (EasyCache skips far
# more per unit of threshold than LazyCache).
COMFY_NODES = {"comfy:EasyCache": ("EasyCache", (0.01, 0.02, 0.05, 0.15)),
               "comfy:LazyCache": ("LazyCache", (0.05, 0.15, 0.4, 1.0))}
QUICK_COMFY_THRESHOLDS = (0.2,)
DEFAULT_METHODS = ("fixed+reuse@model", "fixed+taylor2@model", "fixed+taylor2@blocks", "teacache+reuse@span",
                   "teacache+taylor1@span", "teacache+taylor2@span", "first_block+reuse@span",
                   "easycache+reuse@model", *COMFY_NODES)
SLICE_METHODS = ("fixed+reuse@model", "fixed+taylor2@model", "fixed+taylor2@span", "fixed+taylor2@blocks",
                 "fixed+reuse@span+toca0.25", "fixed+reuse@span+clusca0.25")
SPEEDUP_LEVELS = (2.0, 3.0, 5.0)
OUR_NAME = re.compile(r"^(?P<policy>\w+)\+(?P<forecaster>reuse|taylor\d|hicache\d?|ab\d|foca|spectrum|freqca|hyca)"
                      r"@(?P<site>\w+)(?:\+(?P<tokens>toca|clusca|random|duca)(?P<ratio>[0-9.]+))?$")
FORECASTER_TOKEN = re.compile(r"^(?P<kind>[a-z]+?)(?P<order>\d?)$")
# token-level recompute suffixes (e.g. fixed+reuse@span+toca0.25): Cache Token Ratio inputs
TOKEN_METHODS = {"toca": dict(selection="score"), "clusca": dict(selection="cluster"),
                 "random": dict(selection="random"), "duca": dict(selection="random", alternate=True)}
TOKEN_DEFAULTS = dict(selection="score", ratio=0.25, clusters=4, gamma=1.0, alternate=False)  # 4: tiny images
SKIPPED_LINE = re.compile(r"(?:EasyCache|LazyCache) - skipped (\d+)/(\d+) steps")


@dataclasses.dataclass
class Method:
    name: str
    settings: list  # dicts of node inputs, one per point of the sweep
    rewrite: Callable  # (cached case graph, setting) -> graph to run
    fraction_from: str  # "report", "log" or "blocks" (see the module docstring)
    fixed_schedule: bool = False  # computes on a fixed schedule: meaningful on random weights


# -- methods ---------------------------------------------------------------------------------------
def _options(host, class_type: str, name: str) -> list:
    spec = host.node_classes[class_type].INPUT_TYPES()["required"][name]
    return spec[1]["options"] if spec[0] == "COMBO" else list(spec[0])


def _apply_id(graph: dict) -> str:
    ids = [nid for nid, node in graph.items() if node["class_type"] == "ApplyFeatureCache"]
    if len(ids) != 1:
        raise ValueError(f"expected one ApplyFeatureCache node, found {len(ids)}")
    return ids[0]


def _linked_node(graph: dict, apply_id: str, name: str, class_type: str) -> dict:
    """Inputs of the node feeding Apply's optional `name` input; added with the node's defaults if absent."""
    link = graph[apply_id]["inputs"].get(name)
    if link is None:
        defaults = graphs.POLICY_DEFAULTS if name == "policy" else graphs.FORECASTER_DEFAULTS
        node_id = f"frontier_{name}"
        graph[node_id] = {"class_type": class_type, "inputs": dict(defaults)}
        graph[apply_id]["inputs"][name] = [node_id, 0]
        link = [node_id, 0]
    return graph[link[0]]["inputs"]


def _ensure_cache_map(host, graph: dict, apply_id: str) -> None:
    """Adds a Cache Map (the run report) fed by the first LATENT output downstream of Apply."""
    if any(node["class_type"] == "FeatureCacheMap" for node in graph.values()):
        return
    frontier, seen = [apply_id], set()
    while frontier:
        source = frontier.pop(0)
        for nid, node in graph.items():
            if nid in seen or not any(isinstance(v, list) and v[:1] == [source] for v in node["inputs"].values()):
                continue
            seen.add(nid)
            returns = list(host.node_classes[node["class_type"]].RETURN_TYPES)
            if "LATENT" in returns:
                graph["frontier_cache_map"] = {"class_type": "FeatureCacheMap", "inputs": {
                    "model": [apply_id, 0], "samples": [nid, returns.index("LATENT")], "cell_size": 8,
                    "filename_prefix": "feature_cache/map"}}
                return
            frontier.append(nid)
    raise ValueError("no sampler output (LATENT) downstream of ApplyFeatureCache: cannot read the cache report")


def our_method(host, name: str, speeds) -> Method:
    match = OUR_NAME.match(name)
    policies = _options(host, "FeatureCachePolicy", "method")
    sites = _options(host, "ApplyFeatureCache", "site")
    if not match or match["policy"] not in policies or match["site"] not in sites:
        raise ValueError(f"unknown method '{name}'")
    policy, forecaster, site = match["policy"], match["forecaster"], match["site"]
    token = FORECASTER_TOKEN.match(forecaster)
    forecaster_inputs = dict(method=token["kind"], order=int(token["order"] or graphs.FORECASTER_DEFAULTS["order"]))
    tokens = match["tokens"] and {**TOKEN_DEFAULTS, **TOKEN_METHODS[match["tokens"]], "ratio": float(match["ratio"])}

    def rewrite(graph, setting):
        graph = copy.deepcopy(graph)
        apply_id = _apply_id(graph)
        graph[apply_id]["inputs"]["site"] = site
        _linked_node(graph, apply_id, "policy", "FeatureCachePolicy").update(method=policy, threshold=-1.0, **setting)
        _linked_node(graph, apply_id, "forecaster", "FeatureCacheForecaster").update(forecaster_inputs)
        if tokens:
            graph["frontier_tokens"] = {"class_type": "FeatureCacheTokenRatio", "inputs": dict(tokens)}
            graph[apply_id]["inputs"]["tokens"] = ["frontier_tokens", 0]
        _ensure_cache_map(host, graph, apply_id)
        return graph

    return Method(name, [{"speed": s} for s in speeds], rewrite, "report", fixed_schedule=policy == "fixed")


def workflow_method_name(graph: dict) -> str:
    """The name of the cache configuration a workflow holds (defaults as Apply Feature Cache's)."""
    apply = graph[_apply_id(graph)]["inputs"]
    policy = graph[apply["policy"][0]]["inputs"]["method"] if "policy" in apply else "teacache"
    forecaster = "reuse"
    if "forecaster" in apply:
        f = graph[apply["forecaster"][0]]["inputs"]
        default_order = graphs.FORECASTER_DEFAULTS["order"]
        forecaster = ("reuse" if f["method"] == "reuse" or (f["method"] == "taylor" and f["order"] == 0)
                      else f"{f['method']}{f['order']}" if f["method"] in ("taylor", "ab")
                      else f"hicache{f['order']}" if f["method"] == "hicache" and f["order"] != default_order
                      else f["method"])
    return f"{policy}+{forecaster}@{apply['site']}"


def _parse_value(kind, text: str):
    if kind == "INT":
        return int(text)
    if kind == "FLOAT":
        return float(text)
    if kind == "BOOLEAN":
        return text.lower() in ("1", "true", "yes")
    return text


def node_method(host, name: str, class_type: str, params: dict, fraction_from: str) -> Method:
    """A MODEL->MODEL node from another pack (or the host) put where our Apply Feature Cache was.

    `params` maps input names to lists of value strings; the cartesian product is the sweep, inputs
    not given keep their defaults."""
    cls = host.node_classes[class_type]
    required = cls.INPUT_TYPES().get("required", {})
    if required.get("model", (None,))[0] != "MODEL" or "MODEL" not in list(cls.RETURN_TYPES):
        raise ValueError(f"{name} is not a MODEL -> MODEL node (inputs {list(required)}, outputs {list(cls.RETURN_TYPES)})")
    inputs, sweep = {}, {}
    for key, spec in required.items():
        if key == "model":
            continue
        if spec[0] == "COMBO" or isinstance(spec[0], list):
            inputs[key] = spec[1].get("default", _options(host, class_type, key)[0])
        elif len(spec) > 1 and "default" in spec[1]:
            inputs[key] = spec[1]["default"]
    for key, values in params.items():
        if key not in required or key == "model":
            raise ValueError(f"{name} has no input '{key}'; its inputs: {', '.join(k for k in required if k != 'model')}")
        sweep[key] = [_parse_value(required[key][0], v) for v in values]
    missing = [k for k in required if k != "model" and k not in inputs and k not in sweep]
    if missing:
        raise ValueError(f"{name}: give --param values for the inputs without defaults: {', '.join(missing)}")
    output = list(cls.RETURN_TYPES).index("MODEL")

    def rewrite(graph, setting):
        graph = copy.deepcopy(graph)
        apply_id = _apply_id(graph)
        source = graph[apply_id]["inputs"]["model"]
        graph = {nid: node for nid, node in graph.items()
                 if nid == apply_id or node["class_type"] not in graphs.CACHE_NODE_TYPES}
        graph[apply_id] = {"class_type": class_type, "inputs": {"model": source, **inputs, **setting}}
        if output:
            for node in graph.values():
                for key, value in node["inputs"].items():
                    if isinstance(value, list) and value == [apply_id, 0]:
                        node["inputs"][key] = [apply_id, output]
        return graph

    settings = [dict(zip(sweep, combo)) for combo in itertools.product(*sweep.values())]
    return Method(name, settings, rewrite, fraction_from)


def pack_methods(host, pack: str, classes: list[str], params: dict) -> list[Method]:
    """Loads another custom node pack with the host's loader and wraps the requested nodes."""
    host.load_pack(pack)
    pack_name = os.path.basename(os.path.normpath(pack))
    module = f"custom_nodes.{pack_name}"
    available = sorted(k for k, c in host.node_classes.items() if getattr(c, "RELATIVE_PYTHON_MODULE", None) == module)
    methods = []
    for cls in classes:
        if cls not in available:
            raise ValueError(f"pack {pack_name} has no node '{cls}'; its nodes: {', '.join(available) or '(none)'}")
        methods.append(node_method(host, f"{pack_name}:{cls}", cls, params, "blocks"))
    return methods


def build_methods(host, names, quick: bool) -> list[Method]:
    methods = []
    for name in names:
        if name in COMFY_NODES:
            class_type, thresholds = COMFY_NODES[name]
            thresholds = QUICK_COMFY_THRESHOLDS if quick else thresholds
            methods.append(node_method(host, name, class_type, {"reuse_threshold": [str(t) for t in thresholds]}, "log"))
            continue
        try:
            methods.append(our_method(host, name, QUICK_SPEEDS if quick else SPEEDS))
        except ValueError:
            raise ValueError(
                f"unknown method '{name}'. Available: {', '.join(DEFAULT_METHODS)}; or any POLICY+FORECASTER@SITE with "
                f"POLICY in {_options(host, 'FeatureCachePolicy', 'method')}, FORECASTER reuse or taylor0..taylor4, "
                f"SITE in {_options(host, 'ApplyFeatureCache', 'site')}, optionally +TOKENSratio with TOKENS in "
                f"{', '.join(TOKEN_METHODS)} (e.g. fixed+reuse@span+toca0.25); other packs' nodes: --pack/--node"
            ) from None
    return methods


# -- running and measuring --------------------------------------------------------------------------
class SamplerClock:
    """Time stamps of the host's progress hook: the sampler calls it after every step."""

    def __init__(self):
        self.stamps: list[tuple[str | None, float]] = []
        self.step_seconds: list[float] = []  # durations of steps 1.. of the last taken run's samplers

    def __enter__(self):
        import comfy.utils
        self._utils = comfy.utils
        self._previous = (comfy.utils.PROGRESS_BAR_HOOK, comfy.utils.PROGRESS_BAR_ENABLED)
        comfy.utils.set_progress_bar_global_hook(self._hook)
        comfy.utils.set_progress_bar_enabled(False)  # no tqdm bars on stderr
        return self

    def __exit__(self, *exc):
        self._utils.set_progress_bar_global_hook(self._previous[0])
        self._utils.set_progress_bar_enabled(self._previous[1])

    def _hook(self, *args, **kwargs):
        from comfy_execution.utils import get_executing_context
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # kernels are asynchronous: stamp when the step has really finished
        context = get_executing_context()
        self.stamps.append((context.node_id if context else None, time.perf_counter()))
        if self._previous[0] is not None:
            self._previous[0](*args, **kwargs)

    def take(self) -> tuple[float, int, int]:
        """(seconds between each sampler node's first and last step, steps in them, sampler nodes); resets."""
        by_node: dict = {}
        for node, stamp in self.stamps:
            by_node.setdefault(node, []).append(stamp)
        self.stamps = []
        self.step_seconds = [b - a for s in by_node.values() for a, b in zip(s, s[1:])]
        return (sum(s[-1] - s[0] for s in by_node.values()), sum(len(s) - 1 for s in by_node.values()), len(by_node))


@contextlib.contextmanager
def counting_blocks():
    """Counts forward calls of transformer blocks (Wan, Flux), whoever calls or skips them."""
    import comfy.ldm.flux.layers
    import comfy.ldm.wan.model
    kinds = (comfy.ldm.wan.model.WanAttentionBlock, comfy.ldm.flux.layers.DoubleStreamBlock,
             comfy.ldm.flux.layers.SingleStreamBlock)
    count = [0]

    def hook(module, args):
        if isinstance(module, kinds):
            count[0] += 1

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        yield count
    finally:
        handle.remove()


@dataclasses.dataclass
class Run:
    images: torch.Tensor
    latent: torch.Tensor | None
    timing: tuple  # SamplerClock.take()
    report: dict | None
    log: list
    step_seconds: list  # SamplerClock.step_seconds: steps 1.. (step 0 ends before the first stamp)


def _saved_images(outputs: dict) -> torch.Tensor:
    """The IMAGE outputs a workflow saved or previewed, [N, 3, H, W] in [0, 1]."""
    import folder_paths
    images = []
    for node_id in sorted(outputs):
        for item in outputs[node_id].get("images", []):
            path = os.path.join(folder_paths.get_directory_by_type(item["type"]), item.get("subfolder", ""),
                                item["filename"])
            array = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
            images.append(torch.from_numpy(array).permute(2, 0, 1))
    if not images:
        raise ValueError("the graph saved no images (add a SaveImage or PreviewImage node) and has no latent capture")
    return torch.stack(images)


def run_graph(host, graph: dict, clock: SamplerClock, log_lines: list) -> Run:
    start = len(log_lines)
    outputs = host.execute(graph)
    timing = clock.take()
    capture = next((n for n in graph.values() if n["class_type"] == "FCFixtureCapture"), None)
    latent = host.captured(capture["inputs"]["key"]) if capture else None
    images = frames(latent) if latent is not None else _saved_images(outputs)
    report = next((ui["feature_cache_report"][0] for ui in outputs.values() if "feature_cache_report" in ui), None)
    return Run(images, latent, timing, report, log_lines[start:], clock.step_seconds)


def _sampler_seconds(timings: list, uncached: list) -> float:
    """Median sampler time; the first step of each sampler (before the first stamp) at the uncached rate."""
    per_step = sum(t[0] for t in uncached) / max(1, sum(t[1] for t in uncached))
    return statistics.median(t[0] + t[2] * per_step for t in timings)


def partial_step_cost(runs: list, uncached_step_seconds: list) -> float | None:
    """Median wall-clock of the partial (token-level) steps of runs with one model evaluation per step / the
    median step of the interleaved uncached runs (step k lasts from the (k-1)-th to the k-th progress stamp)."""
    partial = []
    for run in runs:
        decisions = [e["decision"] for e in run.report["trace"]["evaluations"]] if run.report else []
        if len(decisions) == len(run.step_seconds) + 1:
            partial += [seconds for d, seconds in zip(decisions[1:], run.step_seconds) if d == "partial"]
    if not partial or not uncached_step_seconds:
        return None
    return statistics.median(partial) / statistics.median(uncached_step_seconds)


def _fraction_from_log(lines: list) -> float:
    matches = [SKIPPED_LINE.search(line) for line in lines]
    skipped, total = next((m.groups() for m in reversed(matches) if m), (None, None))
    if total is None:
        raise ValueError("no 'skipped X/Y steps' line in the host's log")
    return 1.0 - int(skipped) / int(total)


def measure(host, case, method: Method, setting: dict, references: list, clock: SamplerClock, log_lines: list,
            uncached_blocks: dict) -> dict:
    record = dict(model=case.model, case=case.name, method=method.name, setting=setting, status="ok", error=None,
                  samples=len(case.graphs), compute_fraction=None, ideal_speedup=None, wallclock_speedup=None,
                  efficiency=None, psnr=None, ssim=None, latent_psnr=None, cache_bytes=None,
                  sampler_seconds=None, sampler_seconds_uncached=None, partial_step_cost=None)
    try:
        fractions, fidelity, cache_bytes, cached_t, uncached_t, cached_runs, uncached_steps = [], [], [], [], [], [], []
        for k in range(max(len(case.graphs), case.repeats)):
            graph = case.graphs[k % len(case.graphs)]
            if k < case.repeats:
                uncached = run_graph(host, graphs.without_cache(graph), clock, log_lines)
                uncached_t.append(uncached.timing)
                uncached_steps += uncached.step_seconds
            run = run_graph(host, method.rewrite(graph, setting), clock, log_lines)
            cached_t.append(run.timing)
            cached_runs.append(run)
            if k >= len(case.graphs):
                continue
            ref = references[k]
            fidelity.append((min(psnr(run.images, ref.images), PSNR_CAP), ssim(run.images, ref.images),
                             None if ref.latent is None else
                             min(psnr(run.latent, ref.latent, float(ref.latent.abs().max())), PSNR_CAP)))
            if method.fraction_from == "report":
                if run.report is None:
                    raise ValueError("the cached run produced no cache report")
                fractions.append(run.report["compute_fraction"])
                cache_bytes.append(run.report["peak_cache_bytes"])
            elif method.fraction_from == "log":
                fractions.append(_fraction_from_log(run.log))
        if method.fraction_from == "blocks":
            fractions.append(_block_fraction(host, case.graphs[0], method.rewrite(case.graphs[0], setting), clock,
                                             log_lines, uncached_blocks))
        fraction = statistics.mean(fractions)
        u_seconds, c_seconds = _sampler_seconds(uncached_t, uncached_t), _sampler_seconds(cached_t, uncached_t)
        wallclock = u_seconds / c_seconds
        ideal = 1.0 / fraction if fraction > 0 else math.inf
        record.update(compute_fraction=fraction, ideal_speedup=ideal, wallclock_speedup=wallclock,
                      efficiency=wallclock / ideal, sampler_seconds=c_seconds, sampler_seconds_uncached=u_seconds,
                      psnr=statistics.mean(f[0] for f in fidelity), ssim=statistics.mean(f[1] for f in fidelity),
                      latent_psnr=None if fidelity[0][2] is None else statistics.mean(f[2] for f in fidelity),
                      cache_bytes=max(cache_bytes) if cache_bytes else None,
                      partial_step_cost=partial_step_cost(cached_runs, uncached_steps))
    except Exception as error:  # a failing method or node is a result, not the end of the benchmark
        record.update(status="failed", error=f"{type(error).__name__}: {str(error).strip().splitlines()[0][:500]}")
    return record


def _block_fraction(host, plain: dict, cached: dict, clock, log_lines, uncached_blocks: dict) -> float:
    """Block calls of a cached run / of the uncached run (counted once per graph)."""
    key = json.dumps(plain, sort_keys=True)
    if key not in uncached_blocks:
        with counting_blocks() as count:
            run_graph(host, graphs.without_cache(plain), clock, log_lines)
        uncached_blocks[key] = count[0]
    with counting_blocks() as count:
        run_graph(host, cached, clock, log_lines)
    if not uncached_blocks[key]:
        raise ValueError("no Wan or Flux transformer blocks ran: cannot count the compute fraction of this model")
    return count[0] / uncached_blocks[key]


@contextlib.contextmanager
def info_logs():
    """Collects INFO log lines (the host's EasyCache / LazyCache report skipped steps there) without
    letting the handlers already on the root logger print them."""
    root = logging.getLogger()
    level = root.getEffectiveLevel()
    quieted = [(h, h.level) for h in root.handlers]
    for handler, handler_level in quieted:
        handler.setLevel(max(handler_level, level))
    collector = host_module.LogCollector()
    root.addHandler(collector)
    root.setLevel(logging.INFO)
    try:
        yield collector.lines
    finally:
        root.removeHandler(collector)
        root.setLevel(level)
        for handler, handler_level in quieted:
            handler.setLevel(handler_level)


@contextlib.contextmanager
def torch_threads(n: int | None):
    previous = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run_case(host, case, methods: list, clock, log_lines, progress) -> list:
    with torch_threads(case.threads):
        references = [run_graph(host, graphs.without_cache(g), clock, log_lines) for g in case.graphs]
        records, uncached_blocks = [], {}
        for method in methods:
            for setting in method.settings:
                started = time.perf_counter()
                record = measure(host, case, method, setting, references, clock, log_lines, uncached_blocks)
                records.append(record)
                progress(record, time.perf_counter() - started)
    return records


# -- outputs --------------------------------------------------------------------------------------
def _fmt(value, spec=".2f", none="—"):
    return none if value is None else format(value, spec)


def _setting(setting: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in setting.items()) or "defaults"


def best_psnr(records: list, level: float):
    values = [r["psnr"] for r in records if r["status"] == "ok" and r["ideal_speedup"] >= level]
    return max(values) if values else None


def _cases_in_order(records):
    return list(dict.fromkeys((r["model"], r["case"]) for r in records))


def frontier_table(records: list) -> str:
    """Per case: the best PSNR each method reaches at or above 2x, 3x, 5x ideal speedup."""
    lines = []
    for model, case in _cases_in_order(records):
        rows = [r for r in records if (r["model"], r["case"]) == (model, case)]
        lines += [f"### {model}: {case}", "", "| method | " + " | ".join(f"best PSNR ≥{x:g}×" for x in SPEEDUP_LEVELS)
                  + " | max ideal speedup |", "|---|" + "---:|" * (len(SPEEDUP_LEVELS) + 1)]
        for method in dict.fromkeys(r["method"] for r in rows):
            mine = [r for r in rows if r["method"] == method]
            ok = [r["ideal_speedup"] for r in mine if r["status"] == "ok"]
            cells = [_fmt(best_psnr(mine, x), ".1f") for x in SPEEDUP_LEVELS]
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {_fmt(max(ok) if ok else None)} |")
        lines.append("")
    return "\n".join(lines)


def records_table(records: list) -> str:
    lines = ["| model | case | method | setting | compute fraction | ideal × | wall-clock × | efficiency | PSNR dB | "
             "SSIM | latent PSNR | cache KiB | status |", "|---|---|---|---|" + "---:|" * 8 + "---|"]
    for r in records:
        status = r["status"] if r["status"] == "ok" else f"failed: {r['error']}"
        kib = None if r["cache_bytes"] is None else r["cache_bytes"] / 1024
        lines.append(f"| {r['model']} | {r['case']} | {r['method']} | {_setting(r['setting'])} | "
                     f"{_fmt(r['compute_fraction'], '.3f')} | {_fmt(r['ideal_speedup'])} | {_fmt(r['wallclock_speedup'])} | "
                     f"{_fmt(r['efficiency'])} | {_fmt(r['psnr'], '.2f')} | {_fmt(r['ssim'], '.4f')} | "
                     f"{_fmt(r['latent_psnr'], '.2f')} | {_fmt(kib, '.1f')} | {status.replace('|', '/')} |")
    return "\n".join(lines)


def write_markdown(path: str, records: list, speed_records: list, context: dict) -> None:
    lines = ["# Feature cache frontier", "",
             f"Command: `{context['command']}`  ", f"Host: ComfyUI at {context['host']}, device {context['device']}  ",
             f"Finished in {context['seconds']:.0f} s on {context['date']}", ""]
    lines += [f"- {kind}: {origin}" for kind, origin in context["models"].items()]
    lines += ["", f"PSNR/SSIM: decoded output vs the uncached output of the same graph and seed, mean over the "
              f"samples; {PSNR_CAP:g} dB = identical. Ideal speedup = 1 / compute fraction; wall-clock = median "
              "sampler time of interleaved uncached / cached runs (see benchmarks/frontier.py). Tiny models on a "
              "shared CPU: wall-clock numbers are indicative; the slice below is the speed measurement.", "",
              "## Best PSNR at or above an ideal speedup", "", frontier_table(records)]
    if speed_records:
        lines += ["## Speed: real-dims slice (efficiency = wall-clock / ideal speedup)", "",
                  "Partial step cost: median wall-clock of a token-level partial step / of an uncached step.", "",
                  "| method | setting | ideal × | wall-clock × | efficiency | partial step cost |",
                  "|---|---|---:|---:|---:|---:|"]
        lines += [f"| {r['method']} | {_setting(r['setting'])} | {_fmt(r['ideal_speedup'])} | "
                  f"{_fmt(r['wallclock_speedup'])} | {_fmt(r['efficiency'])} | {_fmt(r.get('partial_step_cost'))} |"
                  for r in speed_records]
        lines.append("")
    lines += ["## All records", "", records_table(records + speed_records), ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def write_plot(path: str, records: list) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = _cases_in_order(records)
    columns = min(2, len(cases)) or 1
    rows = math.ceil(len(cases) / columns) or 1
    fig, axes = plt.subplots(rows, columns, figsize=(7 * columns, 4.5 * rows), squeeze=False)
    for ax, (model, case) in zip(axes.flat, cases):
        mine = [r for r in records if (r["model"], r["case"]) == (model, case) and r["status"] == "ok"]
        for method in dict.fromkeys(r["method"] for r in mine):
            points = sorted((r["ideal_speedup"], r["psnr"]) for r in mine if r["method"] == method)
            style = "--" if ":" in method else "-"
            ax.plot([p[0] for p in points], [p[1] for p in points], style, marker="o", markersize=3, label=method)
        below_cap = [r["psnr"] for r in mine if r["psnr"] < PSNR_CAP]
        if below_cap:  # identical outputs (PSNR_CAP) would squash the frontier: they run off the top
            ax.set_ylim(min(below_cap) - 2, max(below_cap) + 5)
        ax.set_title(f"{model}: {case}", fontsize=9)
        ax.set_xlabel("ideal speedup (1 / compute fraction)")
        ax.set_ylabel("PSNR vs uncached (dB)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(cases):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- command line ---------------------------------------------------------------------------------
def _params(items: list) -> dict:
    out = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--param expects key=value or key=v1,v2,...; got '{item}'")
        out[key] = values.split(",")
    return out


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, few steps, one sample, one setting per method")
    parser.add_argument("--out", default=os.path.join(REPO_ROOT, "out", "bench"))
    parser.add_argument("--cases", nargs="+", help="default: all (wan-image wan-image-dpm wan-video flux-image slice)")
    parser.add_argument("--methods", nargs="+", help=f"default: {' '.join(DEFAULT_METHODS)}")
    parser.add_argument("--pack", help="another custom node pack (folder) to load")
    parser.add_argument("--node", action="append", default=[], help="a MODEL->MODEL node class of --pack (repeatable)")
    parser.add_argument("--param", action="append", default=[],
                        help="key=value (fixed) or key=v1,v2,... (swept) input of every --node (repeatable)")
    parser.add_argument("--model-file", help="a Wan-architecture checkpoint (16-channel latents, 32x32-pixel images)")
    parser.add_argument("--cond-file", help="its label embeddings: 'labels' [N, L, 4096], the last row the negative")
    parser.add_argument("--workflow", help="an API-format workflow holding one ApplyFeatureCache; sweeps its settings")
    args = parser.parse_args(argv)
    if bool(args.model_file) != bool(args.cond_file):
        parser.error("--model-file and --cond-file go together")
    if bool(args.pack) != bool(args.node):
        parser.error("--pack and --node go together")
    if args.workflow and args.model_file:
        parser.error("--workflow and --model-file are alternatives")
    return args


def select_cases(host, args, workflow) -> tuple[list, dict]:
    """(the cases to run, where each model came from)."""
    if workflow:
        return [workflow], {"workflow": args.workflow}
    if args.model_file:
        models = frontier_cases.external_wan(host, args.model_file, args.cond_file)
        cases = frontier_cases.tiny_cases(models, args.quick, wan_name=os.path.basename(args.model_file))
        ids = [c.id for c in cases]
    else:
        models = frontier_cases.tiny_models(host, args.out)
        cases = frontier_cases.tiny_cases(models, args.quick)
        ids = [c.id for c in cases] + ["slice"]
    wanted = args.cases or ids
    unknown = [c for c in wanted if c not in ids]
    if unknown:
        raise ValueError(f"unknown case(s) {', '.join(unknown)}; available: {', '.join(ids)}")
    cases = [c for c in cases if c.id in wanted]
    if "slice" in wanted:
        cases.append(frontier_cases.slice_case(host, args.quick))
    return cases, models.origin


def main(argv=None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    host = host_module.boot(output_dir=os.path.join(args.out, "comfy"), cpu=not torch.cuda.is_available())
    workflow = frontier_cases.workflow_case(args.workflow) if args.workflow else None
    names = args.methods or ([workflow_method_name(workflow.graphs[0]), *COMFY_NODES] if workflow else DEFAULT_METHODS)
    packs = pack_methods(host, args.pack, args.node, _params(args.param)) if args.pack else []
    methods = build_methods(host, names, args.quick) + packs
    # The slice has random weights: only fixed schedules mean the same there as on a real model.
    slice_speeds = QUICK_SPEEDS if args.quick else SLICE_SPEEDS
    slice_methods = [m for m in (our_method(host, n, slice_speeds) for n in args.methods or SLICE_METHODS
                                 if n not in COMFY_NODES) if m.fixed_schedule] + packs
    cases, origins = select_cases(host, args, workflow)

    def progress(record, seconds):
        detail = (f"{record['ideal_speedup']:.2f}x ideal, {record['wallclock_speedup']:.2f}x wall, "
                  f"PSNR {record['psnr']:.1f}" if record["status"] == "ok" else record["error"])
        print(f"  {record['method']} {_setting(record['setting'])}: {detail} ({seconds:.1f} s)", flush=True)

    records, speed_records = [], []
    with info_logs() as log_lines, SamplerClock() as clock:
        for case in cases:
            print(f"{case.model}: {case.name} ({len(case.graphs)} samples)", flush=True)
            if case.fixed_only:
                speed_records += run_case(host, case, slice_methods, clock, log_lines, progress)
            else:
                records += run_case(host, case, methods, clock, log_lines, progress)

    context = dict(command="python -m benchmarks.frontier " + " ".join(sys.argv[1:] if argv is None else argv),
                   host=host_module.comfyui_path(), device="cuda" if torch.cuda.is_available() else "cpu",
                   seconds=time.perf_counter() - started, date=time.strftime("%Y-%m-%d %H:%M"), models=origins)
    with open(os.path.join(args.out, "frontier.json"), "w") as f:
        json.dump(records + speed_records, f, indent=1, default=str)
    write_markdown(os.path.join(args.out, "frontier.md"), records, speed_records, context)
    write_plot(os.path.join(args.out, "frontier.png"), records or speed_records)
    print("\n" + frontier_table(records + speed_records))
    print(f"wrote {args.out}/frontier.json, frontier.md, frontier.png in {context['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

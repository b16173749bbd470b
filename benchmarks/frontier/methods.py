"""The methods the frontier compares and the settings each is swept over.

A method is a rewrite of a case's graph (which holds our cache nodes) plus a list of settings:
- ours (names.py): our nodes' inputs; swept over `speed` times the `--set ROLE.input=v1,v2` values.
- the host's built-in EasyCache / LazyCache as comfy:EasyCache / comfy:LazyCache, and any other
  pack's MODEL->MODEL node as PACK:NodeClass, put where Apply Feature Cache was; swept over their
  inputs given by `--param` (scoped to a node class and/or a case: `Class.key@case=v1,v2`).
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import os
from typing import Callable

from benchmarks import graphs
from benchmarks.frontier import names

SPEEDS = (0.39, 0.6, 0.88, 1.0)  # budgets 0.48, 0.32, 0.19, 0.15 (0.15 ** speed): just past 2x, 3x, 5x, and 6.7x
QUICK_SPEEDS = (0.6,)
SLICE_SPEEDS = (0.5,)  # fixed interval 3
# reuse_threshold sweeps spanning each built-in node's range on the tiny models (EasyCache skips far
# more per unit of threshold than LazyCache).
COMFY_NODES = {"comfy:EasyCache": ("EasyCache", (0.01, 0.02, 0.05, 0.15)),
               "comfy:LazyCache": ("LazyCache", (0.05, 0.15, 0.4, 1.0))}
QUICK_COMFY_THRESHOLDS = (0.2,)
# The baseline every cache must beat: no cache, the sampler run with steps / divisor steps (same sampler,
# scheduler and seed), measured against the full-step run like any method.
FEWER_STEPS = "fewer_steps"
FEWER_STEPS_DIVISORS = (2, 3, 5)
QUICK_FEWER_STEPS_DIVISORS = (2,)
STEPS_NODES = ("KSampler", "BasicScheduler")  # the host's nodes whose `steps` input sets the schedule
# `make bench`: every method of ours at least once (each policy with its usual fill and site, each forecaster
# under the default's policy, the token selections, the CFG-branch cache), the host's built-ins and the no-cache
# baseline.
DEFAULT_METHODS = ("default", "planned+reuse@model", "fixed+reuse@model", "fixed+taylor2@model",
                   "fixed+taylor2@blocks", "teacache+reuse@span", "teacache+taylor1@span", "teacache+taylor2@span",
                   "first_block+reuse@span", "easycache+reuse@model", "magcache+reuse@model", "dicache+taylor1@span",
                   "foresight+reuse@blocks", "delta+reuse@blocks", "speca+taylor2@span",
                   "planned+hicache@model", "planned+ab2@model", "planned+foca@model", "planned+spectrum@model",
                   "planned+freqca@model", "planned+hyca@model", "planned+auto@model+cfg",
                   "fixed+reuse@span+toca0.25", "fixed+reuse@span+clusca0.25", "fixed+reuse@span+duca0.25",
                   *COMFY_NODES, FEWER_STEPS)
# Every family on the slice: fixed schedules, each forecaster, token recompute, the adaptive policies, the
# default. On random weights an adaptive policy's decisions mean nothing for fidelity; its speed against its own
# realised compute fraction (efficiency) and the time its indicator costs do.
QUICK_SLICE_METHODS = ("fixed+reuse@model", "fixed+taylor2@model", "fixed+taylor2@span", "fixed+taylor2@blocks",
                       "fixed+reuse@span+toca0.25", "fixed+reuse@span+clusca0.25")
SLICE_METHODS = (*QUICK_SLICE_METHODS, "fixed+hicache@span", "fixed+ab2@span", "fixed+foca@span",
                 "fixed+spectrum@span", "fixed+freqca@span", "fixed+hyca@span", "fixed+auto@span",
                 "teacache+reuse@span",
                 "easycache+reuse@model", "default")


@dataclasses.dataclass
class Method:
    name: str
    settings: list  # dicts of inputs, one per point of the sweep
    rewrite: Callable  # (cached case graph, setting) -> graph to run
    family: str  # "ours" (the run also reports its own compute fraction), "host" (built-in nodes), "peer" or
    # "baseline" (no cache: fewer steps)
    case_settings: dict = dataclasses.field(default_factory=dict)  # case id -> settings, where --param is scoped

    @property
    def ours(self) -> bool:
        return self.family == "ours"

    def settings_for(self, case_id: str) -> list:
        return self.case_settings.get(case_id, self.settings)


def apply_id(graph: dict) -> str:
    ids = [nid for nid, node in graph.items() if node["class_type"] == "ApplyFeatureCache"]
    if len(ids) != 1:
        raise ValueError(f"expected one ApplyFeatureCache node, found {len(ids)}")
    return ids[0]


WIDGET_TYPES = ("INT", "FLOAT", "BOOLEAN", "STRING", "COMBO")


def parse_value(kind, text: str):
    if kind == "INT":
        return int(text)
    if kind == "FLOAT":
        return float(text)
    if kind == "BOOLEAN":
        return text.lower() in ("1", "true", "yes")
    return text


# -- ours -----------------------------------------------------------------------------------------
def _linked_node(host, graph: dict, apply: str, role: str) -> dict:
    """Inputs of the node feeding Apply's optional `role` input; added with the node's defaults if absent."""
    link = graph[apply]["inputs"].get(role)
    if link is None:
        node_id = f"frontier_{role}"
        graph[node_id] = {"class_type": names.NODE_TYPES[role],
                          "inputs": names.node_defaults(host, names.NODE_TYPES[role])}
        graph[apply]["inputs"][role] = [node_id, 0]
        link = [node_id, 0]
    return graph[link[0]]["inputs"]


def _ensure_cache_map(host, graph: dict, apply: str) -> None:
    """Adds a Cache Map (the run report) fed by the first LATENT output downstream of Apply."""
    if any(node["class_type"] == "FeatureCacheMap" for node in graph.values()):
        return
    frontier, seen = [apply], set()
    while frontier:
        source = frontier.pop(0)
        for nid, node in graph.items():
            if nid in seen or not any(isinstance(v, list) and v[:1] == [source] for v in node["inputs"].values()):
                continue
            seen.add(nid)
            returns = list(host.node_classes[node["class_type"]].RETURN_TYPES)
            if "LATENT" in returns:
                graph["frontier_cache_map"] = {"class_type": "FeatureCacheMap", "inputs": {
                    "model": [apply, 0], "samples": [nid, returns.index("LATENT")], "cell_size": 8,
                    "filename_prefix": "feature_cache/map"}}
                return
            frontier.append(nid)
    raise ValueError("no sampler output (LATENT) downstream of ApplyFeatureCache: cannot read the cache report")


def parse_sets(host, items: list) -> dict:
    """`--set ROLE.input=v1,v2` -> {(role, input): [values]}, checked against our nodes' inputs."""
    out = {}
    for item in items:
        key, sep, values = item.partition("=")
        role, dot, name = key.partition(".")
        if not sep or not dot or not values:
            raise ValueError(f"--set expects ROLE.input=v1,v2,... (ROLE: {', '.join(names.NODE_TYPES)}); got '{item}'")
        if role not in names.NODE_TYPES:
            raise ValueError(f"--set '{item}': unknown node '{role}'; ours are {', '.join(names.NODE_TYPES)}")
        inputs = {k: spec for k, spec in names.node_inputs(host, names.NODE_TYPES[role]).items()
                  if isinstance(spec[0], list) or spec[0] in WIDGET_TYPES}
        if name not in inputs:
            raise ValueError(f"--set '{item}': {names.NODE_TYPES[role]} has no input '{name}'; "
                             f"its inputs: {', '.join(inputs)}")
        out[(role, name)] = [parse_value(inputs[name][0], v) for v in values.split(",")]
    return out


def our_method(host, name: str, speeds, sets: dict | None = None) -> Method:
    """One of our methods (names.py), swept over `speed` x the `--set` values of the nodes it uses."""
    method = names.parse(host, name)
    if method.inputs["policy"].get("method") == "magcache":  # its first run of a schedule calibrates: at speed 0
        speeds = (0.0, *speeds)
    sweep = {("policy", "speed"): list(speeds)}
    sweep.update({key: values for key, values in (sets or {}).items() if key[0] in method.inputs})

    def rewrite(graph, setting):
        graph = copy.deepcopy(graph)
        apply = apply_id(graph)
        inputs = graph[apply]["inputs"]
        if method.is_default:  # the nodes' own defaults: only the policy's speed is set
            inputs.update(names.node_defaults(host, names.NODE_TYPES["apply"]))
            policy = _linked_node(host, graph, apply, "policy")
            policy.clear()
            policy.update(names.node_defaults(host, names.NODE_TYPES["policy"]))
        for role in ("forecaster", "tokens"):
            if role not in method.inputs:
                inputs.pop(role, None)
        role_inputs = {role: (inputs if role == "apply" else _linked_node(host, graph, apply, role))
                       for role in method.inputs}
        for role, values in method.inputs.items():
            role_inputs[role].update(values)
        if not method.is_default and "threshold" in role_inputs["policy"]:
            role_inputs["policy"]["threshold"] = -1.0  # the sweep is over speed
            role_inputs["policy"]["max_consecutive"] = -1  # the method's own default (MagCache's K)
        role, key = names.CFG_INPUT
        if key in role_inputs.get(role, {}) and key not in method.inputs.get(role, {}):
            role_inputs[role][key] = False
        for setting_key, value in setting.items():
            role, _, key = setting_key.rpartition(".")
            role_inputs[role or "policy"][key] = value
        _ensure_cache_map(host, graph, apply)
        return graph

    settings = [{f"{role}.{key}" if key != "speed" else key: value for (role, key), value in zip(sweep, combo)}
                for combo in itertools.product(*sweep.values())]
    return Method(name, settings, rewrite, "ours")


def failing_method(name: str, error: Exception, family: str = "ours") -> Method:
    """A method that cannot run here (nodes that lack a part of it, a pack that does not load): one
    failed record per case, with the reason."""
    def rewrite(graph, setting):
        raise error
    return Method(name, [{}], rewrite, family)


def fewer_steps_method(quick: bool) -> Method:
    """No cache, fewer sampler steps: the graph without our nodes, every KSampler / BasicScheduler at
    round(steps / divisor) steps (at least 1)."""
    def rewrite(graph, setting):
        graph = graphs.without_cache(graph)
        nodes = [node for node in graph.values() if node["class_type"] in STEPS_NODES]
        if not nodes:
            raise ValueError(f"{FEWER_STEPS}: the graph has no {' or '.join(STEPS_NODES)} node whose steps it could lower")
        for node in nodes:
            node["inputs"]["steps"] = max(1, round(node["inputs"]["steps"] / setting["divisor"]))
        return graph

    divisors = QUICK_FEWER_STEPS_DIVISORS if quick else FEWER_STEPS_DIVISORS
    return Method(FEWER_STEPS, [{"divisor": d} for d in divisors], rewrite, "baseline")


def workflow_method_name(host, graph: dict) -> str:
    """The name of the cache configuration a workflow holds."""
    return names.name_of(host, graph, apply_id(graph))


# -- other nodes (the host's built-ins, other packs) -----------------------------------------------
@dataclasses.dataclass(frozen=True)
class Param:
    """`--param [Class.]key[@case]=v1,v2`: values of a node input, for one node class and/or one case."""

    node: str | None
    key: str
    case: str | None
    values: list

    @classmethod
    def parse(cls, item: str) -> "Param":
        target, sep, values = item.partition("=")
        target, _, case = target.partition("@")
        node, dot, key = target.rpartition(".")
        if not sep or not key or not values:
            raise ValueError(f"--param expects [Class.]key[@case]=value or =v1,v2,...; got '{item}'")
        return cls(node if dot else None, key, case or None, values.split(","))


def node_method(host, name: str, class_type: str, params: list, family: str, case_ids=()) -> Method:
    """A MODEL->MODEL node from another pack (or the host) put where our Apply Feature Cache was.

    `params` (Param) give input values; the cartesian product is the sweep, inputs not given keep their
    defaults. A param scoped to a case applies there only, on top of the unscoped ones."""
    cls = host.node_classes[class_type]
    accepted = names.node_inputs(host, class_type)
    if accepted.get("model", (None,))[0] != "MODEL" or "MODEL" not in list(cls.RETURN_TYPES):
        raise ValueError(f"{name} is not a MODEL -> MODEL node (inputs {list(accepted)}, "
                         f"outputs {list(cls.RETURN_TYPES)})")
    required = cls.INPUT_TYPES().get("required", {})
    inputs = {k: v for k, v in names.node_defaults(host, class_type).items() if k != "model"}
    mine = [p for p in params if p.node in (None, class_type)]
    for param in mine:
        if param.key not in accepted or param.key == "model":
            raise ValueError(f"{name} has no input '{param.key}'; its inputs: "
                             f"{', '.join(k for k in accepted if k != 'model')}")
        if param.case is not None and param.case not in case_ids:
            raise ValueError(f"--param {param.node or ''}.{param.key}@{param.case}: unknown case '{param.case}'; "
                             f"available: {', '.join(case_ids)}")

    def sweep_of(case):
        sweep = {}
        for param in mine:
            if param.case in (None, case):
                sweep[param.key] = [parse_value(accepted[param.key][0], v) for v in param.values]
        missing = [k for k in required if k != "model" and k not in inputs and k not in sweep]
        if missing:
            raise ValueError(f"{name}: give --param values for the inputs without defaults: {', '.join(missing)}")
        return [dict(zip(sweep, combo)) for combo in itertools.product(*sweep.values())]

    output = list(cls.RETURN_TYPES).index("MODEL")

    def rewrite(graph, setting):
        graph = copy.deepcopy(graph)
        apply = apply_id(graph)
        source = graph[apply]["inputs"]["model"]
        graph = {nid: node for nid, node in graph.items()
                 if nid == apply or node["class_type"] not in graphs.CACHE_NODE_TYPES}
        graph[apply] = {"class_type": class_type, "inputs": {"model": source, **inputs, **setting}}
        if output:
            for node in graph.values():
                for key, value in node["inputs"].items():
                    if isinstance(value, list) and value == [apply, 0]:
                        node["inputs"][key] = [apply, output]
        return graph

    scoped = {p.case for p in mine if p.case is not None}
    return Method(name, sweep_of(None), rewrite, family, case_settings={c: sweep_of(c) for c in scoped})


def pack_methods(host, pack: str, classes: list[str], params: list, case_ids=()) -> list[Method]:
    """Loads another custom node pack with the host's loader and wraps the requested nodes."""
    host.load_pack(pack)
    pack_name = os.path.basename(os.path.normpath(pack))
    module = f"custom_nodes.{pack_name}"
    available = sorted(k for k, c in host.node_classes.items() if getattr(c, "RELATIVE_PYTHON_MODULE", None) == module)
    methods = []
    for cls in classes:
        if cls not in available:
            raise ValueError(f"pack {pack_name} has no node '{cls}'; its nodes: {', '.join(available) or '(none)'}")
        methods.append(node_method(host, f"{pack_name}:{cls}", cls, params, "peer", case_ids))
    return methods


def build_methods(host, method_names, quick: bool, sets: dict | None = None, params=(), case_ids=(),
                  speeds=None) -> list[Method]:
    """Ours and the host's built-ins by name; `speeds` replaces the default sweep of ours."""
    speeds = speeds or (QUICK_SPEEDS if quick else SPEEDS)
    methods = []
    for name in method_names:
        if name == FEWER_STEPS:
            methods.append(fewer_steps_method(quick))
            continue
        if name in COMFY_NODES:
            class_type, thresholds = COMFY_NODES[name]
            thresholds = QUICK_COMFY_THRESHOLDS if quick else thresholds
            sweep = [Param(class_type, "reuse_threshold", None, [str(t) for t in thresholds])]
            scoped = [p for p in params if p.node == class_type]  # unscoped --param is for --node
            methods.append(node_method(host, name, class_type, sweep + scoped, "host", case_ids))
            continue
        try:
            methods.append(our_method(host, name, speeds, sets))
        except names.UnsupportedByNodes as error:
            methods.append(failing_method(name, error))
        except ValueError as error:
            raise ValueError(f"unknown method '{name}'. Available: {', '.join(DEFAULT_METHODS)}; or "
                             f"{names.grammar(host)}; other packs' nodes: --pack/--node ({error})") from None
    return methods

"""Our method names, `POLICY+FORECASTER@SITE[+TOKENS<ratio>][+cfg]` or `default`, and the node inputs they mean.

Every part is read from the host's node classes, so a policy, forecaster or site that another change
adds to the nodes' menus is a valid name without editing the benchmark:
- POLICY: an option of Cache Policy's `method` (e.g. `teacache`, `first_block`).
- FORECASTER: an option KIND of Cache Forecaster's `method`, optionally followed by its `order`
  (`reuse`, `taylor2`, `ab3`, `hicache`, ...). Without digits the node's default order is used.
- SITE: an option of Apply Feature Cache's `site`.
- `+SEL<ratio>` (e.g. `+toca0.25`): token-level partial recompute through Cache Token Ratio;
  SEL is a name of TOKEN_METHODS or an option of the node's `selection`, <ratio> its `ratio`.
- `+cfg`: the CFG-branch cache, the node input CFG_INPUT.
- `default`: Apply Feature Cache with its defaults and a Cache Policy at its defaults but `speed`
  (the recommended default an artist gets), no forecaster or tokens connected.
A part the installed nodes do not offer fails with a message saying so, never with a crash.
"""
from __future__ import annotations

import dataclasses
import re

# The graph roles of our nodes, as `--set ROLE.input=...` names them.
NODE_TYPES = {"policy": "FeatureCachePolicy", "forecaster": "FeatureCacheForecaster",
              "tokens": "FeatureCacheTokenRatio", "apply": "ApplyFeatureCache"}
# Token suffix names (the papers' names) -> Cache Token Ratio inputs; any `selection` option also works as is.
# ClusCa with 4 clusters: the tiny models' images have 64-256 tokens (a cluster needs a recomputed token each);
# DuCa is the random selection alternating partial and plain fills.
TOKEN_METHODS = {"toca": {"selection": "score"}, "clusca": {"selection": "cluster", "clusters": 4},
                 "duca": {"selection": "random", "alternate": True}}
# `+cfg` sets this input of this node to True.
CFG_INPUT = ("apply", "cfg_cache")
DEFAULT_NAME = "default"

_NAME = re.compile(r"^(?P<policy>[^+@]+)\+(?P<forecaster>[^+@]+)@(?P<site>[^+@]+)(?P<suffixes>(\+[^+@]+)*)$")
_TOKENS = re.compile(r"^(?P<selection>[A-Za-z_]+?)(?P<ratio>\d*\.?\d+)$")


class UnsupportedByNodes(ValueError):
    """A token or CFG suffix that this version of the nodes does not offer: the benchmark records the
    method as failed with this message instead of stopping."""


def node_inputs(host, class_type: str) -> dict:
    """{input name: spec} of a node class, required and optional."""
    types = host.node_classes[class_type].INPUT_TYPES()
    return {**types.get("required", {}), **types.get("optional", {})}


def options(host, class_type: str, name: str) -> list:
    """The options of a COMBO input (V1 list specs and V3 COMBO specs)."""
    spec = node_inputs(host, class_type)[name]
    return list(spec[1]["options"]) if spec[0] == "COMBO" else list(spec[0])


def node_defaults(host, class_type: str) -> dict:
    """The default value of every widget input of a node (link inputs have none)."""
    out = {}
    for key, spec in host.node_classes[class_type].INPUT_TYPES().get("required", {}).items():
        extra = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
        if spec[0] == "COMBO" or isinstance(spec[0], list):
            out[key] = extra.get("default", options(host, class_type, key)[0])
        elif "default" in extra:
            out[key] = extra["default"]
    return out


@dataclasses.dataclass(frozen=True)
class OurMethod:
    """What a name asks of our nodes: {role: {input: value}}; a role absent from `inputs` is not connected."""

    name: str
    inputs: dict

    @property
    def is_default(self) -> bool:
        return self.name == DEFAULT_NAME


def grammar(host) -> str:
    policy = options(host, NODE_TYPES["policy"], "method")
    forecaster = options(host, NODE_TYPES["forecaster"], "method")
    site = options(host, NODE_TYPES["apply"], "site")
    return (f"'{DEFAULT_NAME}' or POLICY+FORECASTER@SITE[+TOKENS<ratio>][+cfg] with POLICY in {policy}, "
            f"FORECASTER in {forecaster} optionally followed by its order (e.g. taylor2), SITE in {site}, "
            f"TOKENS in {sorted(set(TOKEN_METHODS) | set(_token_selections(host)))}")


def _token_selections(host) -> list:
    try:
        return options(host, NODE_TYPES["tokens"], "selection")
    except KeyError:
        return []


def parse(host, name: str) -> OurMethod:
    """The node inputs of one of our method names; ValueError for an unknown name (UnsupportedByNodes
    for a suffix the installed nodes do not offer)."""
    if name == DEFAULT_NAME:
        return OurMethod(name, {"policy": {}, "apply": {}})
    match = _NAME.match(name)
    if not match:
        raise ValueError(f"'{name}' is not a method name: expected {grammar(host)}")
    policies = options(host, NODE_TYPES["policy"], "method")
    sites = options(host, NODE_TYPES["apply"], "site")
    if match["policy"] not in policies:
        raise ValueError(f"'{name}': policy '{match['policy']}' is not an option of Cache Policy; "
                                 f"available: {', '.join(policies)}")
    if match["site"] not in sites:
        raise ValueError(f"'{name}': site '{match['site']}' is not an option of Apply Feature Cache; "
                                 f"available: {', '.join(sites)}")
    inputs = {"policy": {"method": match["policy"]}, "forecaster": _forecaster(host, name, match["forecaster"]),
              "apply": {"site": match["site"]}}
    for suffix in filter(None, match["suffixes"].split("+")):
        if suffix == "cfg":
            role, key = CFG_INPUT
            if key not in node_inputs(host, NODE_TYPES[role]):
                raise UnsupportedByNodes(f"'{name}': the CFG-branch cache (+cfg) is not supported by this version "
                                         f"({NODE_TYPES[role]} has no '{key}' input)")
            inputs[role][key] = True
        elif "tokens" in inputs:
            raise ValueError(f"'{name}': more than one token suffix")
        else:
            inputs["tokens"] = _tokens(host, name, suffix)
    return OurMethod(name, inputs)


def _forecaster(host, name: str, token: str) -> dict:
    kinds = options(host, NODE_TYPES["forecaster"], "method")
    has_order = "order" in node_inputs(host, NODE_TYPES["forecaster"])
    for kind in sorted(kinds, key=len, reverse=True):  # longest first: a kind may be a prefix of another
        rest = token[len(kind):]
        if token.startswith(kind) and (rest == "" or rest.isdigit()):
            if rest and (not has_order or kind == "reuse"):
                raise ValueError(f"'{name}': forecaster '{kind}' takes no order")
            return {"method": kind, **({"order": int(rest)} if rest else {})}
    raise ValueError(f"'{name}': forecaster '{token}' is not an option of Cache Forecaster (optionally "
                             f"followed by its order); available: {', '.join(kinds)}")


def _tokens(host, name: str, suffix: str) -> dict:
    match = _TOKENS.match(suffix)
    if not match:
        raise ValueError(f"'{name}': suffix '+{suffix}' is neither 'cfg' nor TOKENS<ratio> (e.g. +toca0.25)")
    selection = match["selection"]
    if NODE_TYPES["tokens"] not in host.node_classes:
        raise UnsupportedByNodes(f"'{name}': token-level recompute is not supported by this version (no Cache Token "
                                 "Ratio node)")
    wanted = dict(TOKEN_METHODS.get(selection, {"selection": selection}), ratio=float(match["ratio"]))
    available = node_inputs(host, NODE_TYPES["tokens"])
    for key, value in wanted.items():
        if key not in available:
            raise UnsupportedByNodes(f"'{name}': token method '{selection}' is not supported by this version "
                                     f"(Cache Token Ratio has no '{key}' input)")
        if isinstance(value, str) and value not in options(host, NODE_TYPES["tokens"], key):
            raise UnsupportedByNodes(f"'{name}': token method '{selection}' is not supported by this version "
                                     f"(Cache Token Ratio's {key} options: "
                                     f"{', '.join(options(host, NODE_TYPES['tokens'], key))})")
    return wanted


def name_of(host, graph: dict, apply_id: str) -> str:
    """The method name of the cache configuration a graph holds (unconnected nodes at the nodes' defaults)."""
    apply = graph[apply_id]["inputs"]
    linked = {role: graph[apply[role][0]]["inputs"] for role in ("policy", "forecaster", "tokens") if role in apply}
    if "forecaster" not in linked and "tokens" not in linked and not _cfg_on(graph, apply_id):
        policy = linked.get("policy", {})
        defaults = node_defaults(host, NODE_TYPES["policy"])
        if all(policy.get(k, v) == v for k, v in defaults.items() if k != "speed") and \
                all(apply.get(k, v) == v for k, v in node_defaults(host, NODE_TYPES["apply"]).items()):
            return DEFAULT_NAME
    policy = linked.get("policy", {}).get("method") or node_defaults(host, NODE_TYPES["policy"])["method"]
    forecaster = linked.get("forecaster", {"method": "reuse"})
    kind, order = forecaster["method"], forecaster.get("order")
    default_order = node_defaults(host, NODE_TYPES["forecaster"]).get("order")
    token = kind if kind == "reuse" or order in (None, default_order) else f"{kind}{order}"
    name = f"{policy}+{token}@{apply['site']}"
    if "tokens" in linked:
        tokens = linked["tokens"]
        alias = next((k for k, v in TOKEN_METHODS.items() if v["selection"] == tokens["selection"]
                      and v.get("alternate", False) == tokens.get("alternate", False)), tokens["selection"])
        name += f"+{alias}{tokens['ratio']:g}"
    if _cfg_on(graph, apply_id):
        name += "+cfg"
    return name


def _cfg_on(graph: dict, apply_id: str) -> bool:
    role, key = CFG_INPUT
    node = graph[apply_id]["inputs"] if role == "apply" else \
        graph.get(graph[apply_id]["inputs"].get(role, [None])[0], {}).get("inputs", {})
    return bool(node.get(key))

"""Test instrumentation for the reliability tests: what the model really ran, what a run left behind.

- `CallLog`: forward hooks on a diffusion model and its blocks record, per model call, its sigma,
  its conditionings and the blocks that ran, so a report can be checked against the calls made.
- `snapshot` / `assert_unchanged`: parameters, buffers, hooks, instance attributes and options.
- `tensors_of`: weak references to every tensor reachable from an object (a run's caches).
"""
from __future__ import annotations

import weakref

import torch

from cache_core import POLICIES

BLOCK_LISTS = ("double_blocks", "single_blocks", "blocks")
# a partial cell (token-level recompute) runs its block on some tokens; a rejected one ran to verify a draft
RAN = ("computed", "partial", "rejected")


def blocks_of(diffusion_model) -> list:
    return [b for name in BLOCK_LISTS if hasattr(diffusion_model, name) for b in getattr(diffusion_model, name)]


class CallLog:
    """Per model call: {"sigma", "uuids", "blocks": set of global block indices that ran}."""

    def __init__(self, diffusion_model):
        self.calls: list = []
        self.handles = [diffusion_model.register_forward_pre_hook(self._model_call, with_kwargs=True)]
        for g, block in enumerate(blocks_of(diffusion_model)):
            self.handles.append(block.register_forward_pre_hook(self._block_call(g)))

    def _model_call(self, module, args, kwargs):
        options = kwargs.get("transformer_options") or {}
        sigmas = options.get("sigmas")
        sigma = float(sigmas.flatten()[0]) if sigmas is not None else None
        self.calls.append({"sigma": sigma, "uuids": list(options.get("uuids", [])), "blocks": set()})

    def _block_call(self, g):
        def hook(module, args):
            if self.calls:
                self.calls[-1]["blocks"].add(g)
        return hook

    def clear(self):
        self.calls = []

    def remove(self):
        for handle in self.handles:
            handle.remove()


def check_report_against_calls(report: dict, calls: list, cached_rows: list) -> None:
    """The report's trace says computed exactly where the model (or the cached blocks) ran.

    Grouped by sigma (a multi-evaluation solver may revisit one): a cached row ran at a sigma iff some
    evaluation at that sigma marks it computed; evaluations_computed counts the evaluations whose
    decision is computed and every such evaluation ran a cached row (or the model), and a filled
    evaluation ran none. Calls another node ran apart from the cache (`aside`) run every block.
    """
    evaluations = report["trace"]["evaluations"]
    rows = report["trace"]["rows"]
    policy = POLICIES.get(report["method"])
    # per-block policies fill some segments of an evaluation and compute others; a verifying one (SpeCa) runs
    # its verified block on a filled evaluation
    per_block = policy is not None and (policy.per_segment or policy.verifies)
    assert report["evaluations"] == len(evaluations)
    assert report["evaluations_computed"] == sum(e["decision"] == "computed" for e in evaluations)
    assert report["evaluations_filled"] == sum(e["decision"] != "computed" for e in evaluations)  # partial included
    by_sigma: dict = {}
    for call in calls:
        if call["sigma"] is not None:
            by_sigma.setdefault(round(call["sigma"], 6), []).append(call)
    traced: dict = {}
    for e in evaluations:
        traced.setdefault(round(e["sigma"], 6), []).append(e)
    for sigma, evs in traced.items():
        ran = set().union(*(c["blocks"] for c in by_sigma.get(sigma, []))) if rows != ["model"] else None
        for e in evs:
            computed_rows = [g for g in cached_rows if e["actions"][g] in RAN]
            if e["decision"] in RAN:
                assert computed_rows, f"evaluation {e['index']} is reported {e['decision']} but ran no cached row"
            elif not per_block:
                assert not computed_rows, f"evaluation {e['index']} is reported filled but computed rows {computed_rows}"
        if rows == ["model"]:
            any_computed = any(e["decision"] in RAN for e in evs)
            model_calls = len(by_sigma.get(sigma, [])) - sum(e.get("aside", 0) for e in evs)
            assert (model_calls > 0) == any_computed, (sigma, model_calls, [e["decision"] for e in evs])
        else:
            marked = {g for e in evs for g, a in enumerate(e["actions"]) if a in RAN}
            if any(e.get("aside", 0) for e in evs):
                assert marked <= ran, (sigma, sorted(marked), sorted(ran))  # another node's pass ran blocks too
            else:
                assert ran == marked, f"sigma {sigma}: blocks ran {sorted(ran)}, trace marks {sorted(marked)}"
    untraced = [s for s in by_sigma if s not in traced and s > 0]
    assert not untraced, f"model calls at sigmas {untraced} are missing from the trace"


def _structure(patcher) -> dict:
    """What sampling must leave as it was, apart from the weights."""
    model = patcher.model
    return {
        "modules": [(n, type(m)) for n, m in model.named_modules()],
        "hooks": [(n, len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()],
        "attrs": {n: sorted(vars(m).keys()) for n, m in model.named_modules()},
        "forward": model.diffusion_model.forward.__func__,
        "options": repr(patcher.model_options),
        "object_patches": dict(patcher.object_patches),
    }


def snapshot(patcher) -> dict:
    params = {k: v.detach().clone() for k, v in patcher.model.state_dict().items()}
    return {"params": params, **_structure(patcher)}


def assert_unchanged(before: dict, patcher) -> None:
    """`patcher` (its model and options) is as `before = snapshot(patcher)` recorded it."""
    model = patcher.model
    after = _structure(patcher)
    for key, value in after.items():
        if key == "attrs" and value != before[key]:
            diff = {n: sorted(set(value.get(n, [])) ^ set(before[key].get(n, []))) for n in set(value) | set(before[key])}
            raise AssertionError(f"module attributes changed: { {n: d for n, d in diff.items() if d} }")
        assert value == before[key], f"the model's {key} changed"
    params = model.state_dict()
    assert params.keys() == before["params"].keys()
    changed = [k for k, v in before["params"].items() if not torch.equal(params[k], v)]
    assert not changed, f"parameters changed: {changed[:5]}"


def tensors_of(root, limit: int = 100000) -> list:
    """Weak references to the tensors reachable from `root` through attributes, dicts, lists and tuples."""
    seen, found, stack = set(), [], [root]
    while stack and len(seen) < limit:
        obj = stack.pop()
        if id(obj) in seen or obj is None or isinstance(obj, (str, bytes, int, float, bool, type)):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            found.append(weakref.ref(obj))
        elif isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        elif hasattr(obj, "__dict__") and not isinstance(obj, torch.nn.Module):
            stack.extend(vars(obj).values())
        elif hasattr(obj, "__slots__"):
            stack.extend(getattr(obj, s) for s in obj.__slots__ if hasattr(obj, s))
    return found

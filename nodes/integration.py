"""Hooks the engine into ComfyUI through ModelPatcher wrappers and block replace patches only.

Nothing of the model is modified: `install` returns a clone carrying an OUTER_SAMPLE wrapper that
creates a fresh CacheRun per sampling run (dropped in `finally`), plus either an APPLY_MODEL
wrapper (whole-model site) or `patches_replace["dit"]` entries (block sites).
"""
from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import Optional

import comfy.model_patcher
import comfy.patcher_extension
import comfy_execution.utils
import torch

from ..cache_core import BlockRunner, CacheConfig, CacheRun, COMPUTED, TokenGrid
from .adapters import Adapter, adapter_for
from .progress import send, with_progress

WRAPPER_KEY = "feature_cache"
SETUP_KEY = "feature_cache_setup"
RUN_KEY = "feature_cache_run"
log = logging.getLogger("FeatureCache")


class CacheHandle:
    """Where finished runs publish their reports; shared by every clone of the patched model."""

    def __init__(self, node_id: Optional[str] = None):
        self.node_id = node_id
        self.last: Optional[dict] = None  # the report of the latest finished run
        self.last_prompt: Optional[str] = None  # the prompt that ran it (None outside a prompt)
        self._last_output = None  # weak reference to that run's output latent

    def __deepcopy__(self, memo):
        return self  # ModelPatcher.clone() deep-copies model_options; reports must reach the one handle

    def publish(self, report: dict, output=None) -> None:
        self.last = report
        self.last_prompt = current_prompt_id()
        self._last_output = weakref.ref(output) if isinstance(output, torch.Tensor) else None

    def report_for(self, samples: Optional[torch.Tensor]) -> Optional[dict]:
        """The latest report if it belongs to this prompt or produced `samples` (a sampler output the host cached)."""
        if self.last is None:
            return None
        produced = self._last_output is not None and self._last_output() is samples
        same_prompt = self.last_prompt is None or self.last_prompt == current_prompt_id()
        return self.last if produced or same_prompt else None


def current_prompt_id() -> Optional[str]:
    context = comfy_execution.utils.get_executing_context()
    return None if context is None else context.prompt_id


@dataclass(frozen=True)
class CacheSetup:
    config: CacheConfig
    adapter: Optional[Adapter]
    layout: tuple
    handle: CacheHandle

    @property
    def rows(self) -> list[str]:
        return self.config.site.rows(list(self.layout))


def install(model, config: CacheConfig, handle: CacheHandle):
    """Return a clone of `model` (a ModelPatcher) that samples with feature caching."""
    if SETUP_KEY in model.model_options.get("transformer_options", {}):
        raise ValueError(
            "this model already comes from an Apply Feature Cache node; two caches on one model would fill each "
            "other's computations. Connect the model from before the first Apply Feature Cache, or remove one of them")
    adapter, layout = None, ()
    if config.site.uses_blocks:
        adapter = adapter_for(model.model.diffusion_model)
        layout = tuple(adapter.layout(model.model.diffusion_model))
        config.site.validate(list(layout))
        if config.forecaster.needs_grid and not adapter.has_token_grid:
            raise ValueError(
                f"Feature cache: the '{config.forecaster.kind}' forecaster needs the image-token grid of the blocks, "
                f"which the {adapter.family} adapter does not describe: set Apply Feature Cache's site to 'model' or "
                "choose another Cache Forecaster method")
    if config.tokens is not None:
        raise NotImplementedError(
            "token-level partial recompute (Cache Token Ratio) is not available in this version yet; "
            "disconnect the tokens input")
    model = model.clone()
    model.model_options["transformer_options"][SETUP_KEY] = CacheSetup(config, adapter, layout, handle)
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, _outer_sample)
    if adapter is None:
        model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, _apply_model)
    else:
        model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, _record_latent_shape)
        existing = model.model_options["transformer_options"].get("patches_replace", {}).get("dit", {})
        for kind, count in layout:
            for i in range(count):
                model.set_model_patch_replace(BlockPatch(kind, i, existing.get((kind, i))), "dit", kind, i)
    return model


def _outer_sample(executor, *args, **kwargs):
    """Fresh per-run state for every sampling run, dropped (and reported) in `finally`."""
    guider = executor.class_obj
    original_options = guider.model_options
    setup: CacheSetup = original_options["transformer_options"][SETUP_KEY]
    sigmas = args[3]
    policy = setup.config.policy
    sampling = guider.model_patcher.model.model_sampling
    active = (sampling.percent_to_sigma(policy.start_percent), sampling.percent_to_sigma(policy.end_percent))
    run = CacheRun(setup.config, setup.rows, sigmas.tolist(), active)
    options = comfy.model_patcher.create_model_options_clone(original_options)
    context = _RunContext(run, setup, guider.model_patcher.model.diffusion_model, options["transformer_options"])
    options["transformer_options"][RUN_KEY] = context
    guider.model_options = options
    args = list(args)
    args[5] = with_progress(args[5], run, setup.handle.node_id)  # the step callback
    output = None
    try:
        output = executor(*args, **kwargs)
        return output
    finally:
        guider.model_options = original_options
        report = run.report()
        setup.handle.publish(report, output)
        send(run, setup.handle.node_id, len(sigmas) - 1, len(sigmas) - 1, done=True)
        log.info("FeatureCache %s: computed %d/%d evaluations, compute fraction %.3f (ideal speedup %.2fx), "
                 "peak cache %.1f MiB", report["method"], report["evaluations_computed"], report["evaluations"],
                 report["compute_fraction"], report["ideal_speedup"], report["peak_cache_bytes"] / 2**20)


class _RunContext:
    """The per-run objects reachable from transformer_options during one sampling run."""

    def __init__(self, run: CacheRun, setup: CacheSetup, diffusion_model, transformer_options: dict):
        self.run = run
        self.setup = setup
        self.diffusion_model = diffusion_model
        self.replace_patches = _replace_patches(transformer_options)
        self._checked = (None, False)
        self.blocks = None
        self.latent_shape: Optional[tuple] = None  # of the model call in progress (block sites)
        if setup.adapter is not None:
            adapter = setup.adapter
            self.blocks = BlockRunner(run, setup.config.site.plan(list(setup.layout)), adapter.streams(),
                                      self._modulated_input if adapter.modulated_input else None, self._token_grid)
            replaced = [f"{kind} {i}" for kind, count in setup.layout for i in range(count)
                        if not isinstance(self.replace_patches.get("dit", {}).get((kind, i)), BlockPatch)]
            if replaced:
                run.stand_aside(f"another node replaced blocks after Apply Feature Cache ({_first(replaced)}): "
                                "this run is not cached; apply the feature cache after that node")
                self.blocks = None

    def foreign(self, transformer_options: dict) -> bool:
        """True for a call whose block patches differ from the run's own: another node's pass
        (Skip Layer Guidance, layer skipping, PAG-like) that must neither use nor feed the caches.
        It runs uncached and the trace counts it."""
        current = transformer_options.get("patches_replace") or {}
        if current is self._checked[0]:  # the blocks of one call share one dict
            return self._checked[1]
        foreign = current != self.replace_patches
        self._checked = (current, foreign)
        if not foreign:
            return False
        changed = [f"{name} {key}" for name in set(current) | set(self.replace_patches)
                   for key in set(current.get(name, {})) | set(self.replace_patches.get(name, {}))
                   if current.get(name, {}).get(key) is not self.replace_patches.get(name, {}).get(key)]
        self.run.stand_aside(f"model calls that replace other blocks ({_first(changed)}; another node's guidance "
                             "pass, e.g. Skip Layer Guidance) ran uncached, apart from the cache")
        return True

    def _token_grid(self, kind, stream):
        return self.setup.adapter.token_grid(kind, stream, self.latent_shape)

    def _modulated_input(self, kind, index, args):
        block = self.setup.adapter.block(self.diffusion_model, kind, index)
        return self.setup.adapter.modulated_input(block, args)

    def __deepcopy__(self, memo):
        return self  # one run, one state, even if an extension deep-copies transformer_options


def _replace_patches(transformer_options: dict) -> dict:
    return {name: dict(patches) for name, patches in (transformer_options.get("patches_replace") or {}).items()}


def _first(names: list, n: int = 4) -> str:
    names = sorted(str(name) for name in names)
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _conditionings(transformer_options) -> list:
    """One key per batch chunk. The host gives the negative's copy of a regional prompt (its area on the
    negative) the prompt's own uuid, so cond_or_uncond tells the two apart."""
    uuids = transformer_options["uuids"]
    return list(zip(uuids, transformer_options.get("cond_or_uncond") or [0] * len(uuids)))


def _current_sigma(transformer_options) -> float:
    return float(transformer_options["sigmas"].flatten()[0])


def _record_latent_shape(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={},
                         **kwargs):
    """Block sites: the blocks see tokens; their image-token grid comes from the latent of the model call."""
    context: Optional[_RunContext] = transformer_options.get(RUN_KEY)
    if context is None:
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    previous, context.latent_shape = context.latent_shape, tuple(x.shape)
    try:
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    finally:
        context.latent_shape = previous


def _apply_model(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
    """Whole-model site: caches the sampler's derivative eps = (x - denoised) / sigma, any architecture."""
    context: Optional[_RunContext] = transformer_options.get(RUN_KEY)
    if context is None or bool((t == 0).any()) or context.foreign(transformer_options):
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    run = context.run
    run.begin_call(_conditionings(transformer_options), float(t.flatten()[0]), x)
    scale = t.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    if run.decide(["model"], lambda _kind: run.reference_chunk(x)):
        denoised = executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        eps = (x - denoised) / scale
        run.store("model", eps, TokenGrid(tuple(x.shape[2:]), channels_first=True) if x.ndim > 2 else None)
        reference = run.reference_chunk(eps)
        if reference is not None:
            run.computed(reference)
        run.mark(0, COMPUTED)
        return denoised
    run.mark(0, run.fill_action)
    return x - scale * run.fill("model", x)


class BlockPatch:
    """patches_replace["dit"] entry for one block; chains to a replace patch that was there before."""

    def __init__(self, kind: str, index: int, inner=None):
        self.kind = kind
        self.index = index
        self.inner = inner

    def __call__(self, args: dict, extra: dict) -> dict:
        original = extra["original_block"]
        run_block = original if self.inner is None else (lambda a: self.inner(a, {"original_block": original}))
        transformer_options = args.get("transformer_options") or {}
        context: Optional[_RunContext] = transformer_options.get(RUN_KEY)
        if context is None or context.blocks is None or context.foreign(transformer_options):
            return run_block(args)
        return context.blocks(self.kind, self.index, args, run_block, _conditionings(transformer_options),
                              _current_sigma(transformer_options))


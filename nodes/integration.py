"""Hooks the engine into ComfyUI through ModelPatcher wrappers and block replace patches only.

`install` returns a clone carrying an OUTER_SAMPLE wrapper that creates a fresh CacheRun per sampling
run (dropped in `finally`), plus an APPLY_MODEL wrapper: at the whole-model site it caches the model
output; at block sites it makes the run reachable from every block of the call (some forwards do not
pass transformer_options to their block hooks) and, for families without a block replace hook, routes
the block modules' forward through the engine for the duration of the call (see adapters.FORWARD).
Block sites of hooked families use `patches_replace["dit"]` entries. The model is never left modified.
With the CFG-branch cache a CALC_COND_BATCH wrapper (the one place that sees cond and uncond together)
runs the negative branch only on refresh steps.
"""
from __future__ import annotations

import contextvars
import dataclasses
import functools
import inspect
import logging
import time
import weakref
from dataclasses import dataclass
from typing import Optional

import comfy.model_patcher
import comfy.patcher_extension
import comfy_execution.utils
import torch

from ..cache_core import BlockRunner, CacheConfig, CacheRun, COMPUTED, MagCache, TokenGrid
from ..cache_core.sites import SPAN
from ..cache_core.skip_branch import SkipBranch
from .adapters import (FORWARD, REPLACE, SKIP_BRANCH, Adapter, BlockKind, UnsupportedModel, adapter_for,
                       check_host)
from . import progress
from .calibration_store import calibrated_policy, save_calibration

WRAPPER_KEY = "feature_cache"
SETUP_KEY = "feature_cache_setup"
RUN_KEY = "feature_cache_run"
ATTENTION_OVERRIDE = "optimized_attention_override"  # the host's per-call attention hook (comfy...attention.wrap_attn)
log = logging.getLogger("FeatureCache")
# The transformer_options of the model call in progress (for block hooks whose args lack them).
_CALL_OPTIONS: contextvars.ContextVar = contextvars.ContextVar("feature_cache_call_options", default=None)


# Under the host's TorchCompileModel the blocks are compiled, but the hooks' decisions are Python state
# that must never be baked into a graph: dynamo skips these frames (and still compiles the blocks they call).
_not_traced = torch.compiler.disable(recursive=False)


def host_version() -> str:
    try:
        import comfyui_version
        return comfyui_version.__version__
    except ImportError:
        return "(unknown version)"


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
        check_host(adapter, model.model.diffusion_model, host_version())
        layout = tuple(adapter.layout(model.model.diffusion_model))
        config.site.validate(list(layout))
        if adapter.hook == SKIP_BRANCH:
            if config.site.kind != SPAN:
                raise UnsupportedModel(f"{adapter.family}: use the 'span' site (DeepCache: probe_blocks shallow "
                                       "blocks on each side run every step, the deep branch between them is "
                                       "cached) or 'model'")
            SkipBranch(None, list(layout), config.site.probe_blocks)  # validates the depth before sampling
        if config.forecaster.needs_grid and not adapter.has_token_grid:
            raise ValueError(
                f"Feature cache: the '{config.forecaster.kind}' forecaster needs the image-token grid of the blocks, "
                f"which the {adapter.family} adapter does not describe: set Apply Feature Cache's site to 'model' or "
                "choose another Cache Forecaster method")
        # per-family defaults (TeaCache's polynomial, DiCache's gain clip) apply to the block indicators
        config = dataclasses.replace(config, policy=config.policy.for_family(adapter.key))
        if config.tokens is not None:
            adapter.token_layouts()  # raises, naming the block kinds, when the adapter cannot gather tokens
    model = model.clone()
    model.model_options["transformer_options"][SETUP_KEY] = CacheSetup(config, adapter, layout, handle)
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, _outer_sample)
    if config.cfg_refresh:
        model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, WRAPPER_KEY, _calc_cond_batch)
    if adapter is None:
        model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, _apply_model)
        return model
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, _block_call)
    if adapter.hook == REPLACE:
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
    config, notes = setup.config, []
    if isinstance(config.policy, MagCache) and config.policy.calibrating:
        policy, calibration = calibrated_policy(config.policy, guider.model_patcher, args[2], sigmas.tolist())
        config, notes = dataclasses.replace(config, policy=policy), [calibration.message]
    policy = config.policy
    sampling = guider.model_patcher.model.model_sampling
    active = (sampling.percent_to_sigma(policy.start_percent), sampling.percent_to_sigma(policy.end_percent))
    if config.tokens is not None:
        adapter = setup.adapter
        grid = adapter.latent_grid(tuple(args[0].shape), adapter.patch_of(guider.model_patcher.model.diffusion_model))
        if grid is not None:
            try:
                config.tokens.check_tokens(grid.tokens)
            except ValueError as error:
                raise ValueError(f"Feature cache: {error}") from None
    run = CacheRun(config, setup.rows, sigmas.tolist(), active)
    run.notes.extend(notes)
    options = comfy.model_patcher.create_model_options_clone(original_options)
    context = _RunContext(run, setup, guider.model_patcher.model.diffusion_model, options["transformer_options"])
    options["transformer_options"][RUN_KEY] = context
    guider.model_options = options
    stream = progress.start(run, setup.handle.node_id)
    args = list(args)
    args[5] = progress.with_progress(args[5], stream)  # the step callback
    started = time.perf_counter()
    output = None
    try:
        result = output = executor(*args, **kwargs)
        if isinstance(policy, MagCache) and policy.calibrating:  # only a finished run is a calibration
            run.notes.append(save_calibration(calibration, run.policy_state.recorded))
        return result
    finally:
        guider.model_options = original_options
        if setup.adapter is not None and not run.trace.evaluations:
            run.notes.append(f"the {setup.adapter.family} model never called its block hooks in ComfyUI "
                             f"{host_version()} (host drift?): nothing was cached")
        report = {**run.report(), "elapsed_s": time.perf_counter() - started}
        setup.handle.publish(report, output)
        stream.finish(report, len(sigmas) - 1)
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
        self.branch = None
        self.call_has_control = False
        self.latent_shape: Optional[tuple] = None  # of the model call in progress (block sites)
        self.sigma: Optional[float] = None  # of the model call in progress (block sites)
        self.patch = setup.adapter.patch_of(diffusion_model) if setup.adapter is not None else ()
        if setup.adapter is not None and setup.adapter.hook == SKIP_BRANCH:
            self.branch = SkipBranch(run, list(setup.layout), setup.config.site.probe_blocks)
        elif setup.adapter is not None:
            adapter = setup.adapter
            self.blocks = BlockRunner(run, setup.config.site.plan(list(setup.layout)), adapter.streams(),
                                      self._modulated_input if adapter.modulated_input else None, self._token_grid,
                                      adapter.token_layouts() if setup.config.tokens is not None else None,
                                      _with_attention if adapter.hook == REPLACE else None)
            replaced = [f"{kind} {i}" for kind, count in setup.layout for i in range(count)
                        if adapter.hook == REPLACE
                        and not isinstance(self.replace_patches.get("dit", {}).get((kind, i)), BlockPatch)]
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
        return self.setup.adapter.token_grid(kind, stream, self.latent_shape, self.patch)

    def _modulated_input(self, kind, index, args):
        block = self.setup.adapter.block(self.diffusion_model, kind, index)
        return self.setup.adapter.modulated_input(block, args)

    def route_forwards(self, routed: list) -> None:
        """Give each block module an instance `forward` for this call; appends (block, previous) to undo it."""
        adapter = self.setup.adapter
        for kind in adapter.kinds:
            for i, block in enumerate(adapter.blocks(self.diffusion_model, kind)):
                previous = block.__dict__.get("forward")
                block.forward = _RoutedForward(block, kind, i, previous)
                routed.append((block, previous))

    def route_branch(self, routed: list) -> None:
        """Give each layer of the U-Net's deep branch an instance `forward` for this call (see route_forwards)."""
        adapter, depth = self.setup.adapter, self.setup.config.site.probe_blocks
        inputs, middle, outputs = (adapter.blocks(self.diffusion_model, kind) for kind in adapter.kinds)
        layers = [layer for block in inputs[depth:] + middle + outputs[:len(outputs) - depth] for layer in block]
        for i, layer in enumerate(layers):
            previous = layer.__dict__.get("forward")
            layer.forward = _BranchLayer(layer, self, previous, enter=i == 0, exit=i == len(layers) - 1)
            routed.append((layer, previous))

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


def _apply_model(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
    """Whole-model site: caches the sampler's derivative eps = (x - denoised) / sigma, any architecture."""
    context: Optional[_RunContext] = transformer_options.get(RUN_KEY)
    if context is None or context.foreign(transformer_options):
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    timesteps = t.flatten().tolist()  # one host-device synchronisation for the zero check and the sigma
    if 0.0 in timesteps:
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    run = context.run
    with run.timed():
        run.begin_call(_conditionings(transformer_options), timesteps[0], x)
        scale = t.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        if run.decide(["model"], lambda _kind: run.reference_chunk(x)):
            denoised = run.model_call(executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
            eps = (x - denoised) / scale
            run.store("model", eps, TokenGrid(tuple(x.shape[2:]), channels_first=True) if x.ndim > 2 else None)
            reference = run.reference_chunk(eps)
            if reference is not None:
                run.computed(reference, reference)
            run.mark(0, COMPUTED)
            return denoised
        run.mark(0, run.fill_action)
        return run.fill("model", x).mul_(-scale).add_(x)  # x - scale * fill, in the fresh fill (bit-identical)


def _calc_cond_batch(executor, model, conds, x_in, timestep, model_options, **kwargs):
    """CFG-branch cache: the positive branch runs first; the negative one is the positive output plus the
    cached branch difference (cfg 1 has no negative branch: nothing to do). Only evaluations the model
    computes count toward the next refresh, and a refresh that is due waits for one (the negative then runs
    too and the difference is renewed). Where the feature cache fills the positive branch, the negative is
    that fill plus the difference: its own cache predates the positive's latest compute (which ran the
    positive alone), so filling or computing it apart would pair a fresh branch with a stale one."""
    context: Optional[_RunContext] = model_options.get("transformer_options", {}).get(RUN_KEY)
    if context is None or context.run.cfg is None or len(conds) != 2 or not conds[0]:
        return executor(model, conds, x_in, timestep, model_options, **kwargs)
    run = context.run
    if not conds[1]:
        run.cfg_without_negative()
        return executor(model, conds, x_in, timestep, model_options, **kwargs)
    run.prefer_reference((conds[0][0]["uuid"], 0))  # the positive branch's key, as _conditionings makes it
    sigma = timestep.reshape(-1, *([1] * (x_in.ndim - 1))).to(x_in.dtype)
    if bool((sigma == 0).any()):  # the model site passes sigma 0 through uncached: so does this
        return executor(model, conds, x_in, timestep, model_options, **kwargs)
    wants_both = run.cfg.wants_both(x_in, sigma)
    out = executor(model, [conds[0], None], x_in, timestep, model_options, **kwargs)
    computed = run.evaluation_computed()
    if wants_both and (computed or not run.cfg.usable(x_in)):
        negative = executor(model, [None, conds[1]], x_in, timestep, model_options, **kwargs)[1]
        if run.evaluation_computed():  # a difference of two feature-cache fills would refresh nothing
            run.cfg.refreshed(out[0], negative, sigma)
        return [out[0], negative]
    if computed:
        run.ran_for(len(conds[0]) / (len(conds[0]) + len(conds[1])))
    return [out[0], run.cfg.fill(out[0], sigma, computed)]


def _block_call(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
    """Block sites, every model call: publish the call's options; route block forwards where there is no hook."""
    context: Optional[_RunContext] = transformer_options.get(RUN_KEY)
    if context is None:
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    context.call_has_control = control is not None
    if control is not None:
        context.run.note_once(
            "ControlNet residuals enter the U-Net's deep branch: evaluations with control are computed "
            "(forced_by in the trace)" if context.branch is not None else
            "ControlNet residuals entered the blocks: they are added after each block, outside the cached "
            "residuals, so filled steps add the current step's control (caching stays on)")
    token = _CALL_OPTIONS.set(transformer_options)
    # the blocks' image-token grid; reference latents (Kontext, edit models) add tokens after the image tokens,
    # so no grid is claimed for those calls rather than a wrong one
    references = kwargs.get("ref_latents") is not None
    if references:
        context.run.note_once("reference latents follow the image tokens: no image-token grid for these calls "
                                 "(frequency forecasts treat every row as high band)")
    previous_call = context.latent_shape, context.sigma
    context.latent_shape = None if references else tuple(x.shape)
    context.sigma = _current_sigma(transformer_options)  # once per call (per block it would sync with a GPU)
    routed = []
    try:
        if context.setup.adapter.hook == FORWARD:
            context.route_forwards(routed)
        elif context.setup.adapter.hook == SKIP_BRANCH:
            context.route_branch(routed)
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    finally:
        for block, previous in routed:
            del block.forward
            if previous is not None:
                block.forward = previous
        context.latent_shape, context.sigma = previous_call
        _CALL_OPTIONS.reset(token)


def _run_through_engine(kind: str, index: int, args: dict, run_block, transformer_options):
    context: Optional[_RunContext] = (transformer_options or {}).get(RUN_KEY)
    if context is None or context.blocks is None or context.foreign(transformer_options):
        return run_block(args)
    sigma = context.sigma if context.sigma is not None else _current_sigma(transformer_options)
    return context.blocks(kind, index, args, run_block, _conditionings(transformer_options), sigma)


def _with_attention(args: dict, hook) -> dict:
    """A replace-hooked block's args whose transformer_options (a copy, for this block call only) route its
    attention calls through `hook` (cache_core.tokens.SelfAttention), chained to any override already there."""
    options = dict(args.get("transformer_options") or _CALL_OPTIONS.get() or {})
    previous = options.get(ATTENTION_OVERRIDE)

    def override(func, *a, **kw):
        return hook(func if previous is None else functools.partial(previous, func), *a, **kw)

    options[ATTENTION_OVERRIDE] = override
    return {**args, "transformer_options": options}


class BlockPatch:
    """patches_replace["dit"] entry for one block; chains to a replace patch that was there before."""

    def __init__(self, kind: str, index: int, inner=None):
        self.kind = kind
        self.index = index
        self.inner = inner

    @_not_traced
    def __call__(self, args: dict, extra: dict) -> dict:
        original = extra["original_block"]
        run_block = original if self.inner is None else (lambda a: self.inner(a, {"original_block": original}))
        options = args.get("transformer_options") or _CALL_OPTIONS.get()
        return _run_through_engine(self.kind, self.index, args, run_block, options)


class _RoutedForward:
    """A block module's `forward` for one model call: binds the call's arguments by name, runs the engine."""

    def __init__(self, block, kind: BlockKind, index: int, previous):
        self.block, self.kind, self.index = block, kind, index
        self.previous = previous  # an instance forward someone else set, chained to
        self.signature = inspect.signature(type(block).forward)

    @_not_traced
    def __call__(self, *args, **kwargs):
        bound = self.signature.bind(self.block, *args, **kwargs)
        names = list(bound.arguments)[1:]  # without self
        arguments = {name: bound.arguments[name] for name in names}

        def run(a: dict) -> dict:
            bound.arguments.update(a)
            call_args = bound.args[1:]
            if self.previous is not None:
                out = self.previous(*call_args, **bound.kwargs)
            else:
                out = type(self.block).forward(self.block, *call_args, **bound.kwargs)
            return dict(zip(self.kind.returns, out if isinstance(out, tuple) else (out,)))

        result = _run_through_engine(self.kind.name, self.index, arguments, run, _CALL_OPTIONS.get())
        values = tuple(result[name] for name in self.kind.returns)
        return values[0] if len(values) == 1 else values


class _BranchLayer:
    """A deep-branch layer's `forward` for one model call: runs it, or returns a placeholder or the filled branch."""

    def __init__(self, layer, context: _RunContext, previous, enter: bool, exit: bool):
        self.layer, self.context, self.previous, self.enter, self.exit = layer, context, previous, enter, exit

    @_not_traced
    def __call__(self, x, *args, **kwargs):
        branch = self.context.branch
        if self.enter:
            options = _CALL_OPTIONS.get()
            branch.enter(x, _conditionings(options), _current_sigma(options),
                         forced_by="ControlNet" if self.context.call_has_control else None)
        if not branch.compute:
            return branch.filled_exit(x) if self.exit else branch.placeholder(x)
        forward = self.previous or type(self.layer).forward.__get__(self.layer)
        out = forward(x, *args, **kwargs)
        return branch.computed_exit(out) if self.exit else out

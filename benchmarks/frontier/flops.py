"""Floating-point operations of the diffusion model in a run, counted the same way for every method.

The compute fraction of a cached run is its diffusion-model FLOPs over the uncached run's, whatever
the method skips: whole model calls, block spans, single blocks, or modules inside blocks (a pack
that caches inside its blocks still calls every block). The count is torch's own FLOP formulas
(torch.utils.flop_counter: matmuls, convolutions, scaled-dot-product attention, the ops a model's
Linear and attention layers dispatch to), taken while a diffusion model's forward runs: the text
encoder, VAE and sampler arithmetic are not counted; elementwise work (norms, activations, a
cache's own forecasts) is not counted for anyone.
FLOPs inside the transformer blocks (Wan, Flux) are also kept apart, so that a block-level report
(ours counts computed block cells) can be compared with the FLOP count exactly.
"""
from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

_SHAPE_QUERIES = {torch.ops.aten.size.default, torch.ops.aten.stride.default, torch.ops.aten.numel.default,
                  torch.ops.aten.dim.default, torch.ops.aten.storage_offset.default,
                  torch.ops.aten.is_contiguous.default, torch.ops.aten.sym_size.default,
                  torch.ops.aten.sym_stride.default, torch.ops.aten.sym_numel.default}


class FlopCount:
    """FLOPs counted inside diffusion models: `total`, and `blocks` (inside their transformer blocks)."""

    def __init__(self):
        self.total = 0
        self.blocks = 0
        self.model_calls = 0
        self._model_depth = 0
        self._block_depth = 0
        self._diffusion_models: list = []

    def add(self, flops: int) -> None:
        if self._model_depth:
            self.total += flops
            if self._block_depth:
                self.blocks += flops


class _CountingMode(TorchDispatchMode):
    def __init__(self, count: FlopCount):
        super().__init__()
        self.count = count
        self.atomic: set = set()  # ops without a formula that do not decompose: run as they are

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.atomic:
            return func(*args, **kwargs)
        if func in _SHAPE_QUERIES:
            return NotImplemented
        packet = func._overloadpacket
        if packet not in flop_registry:
            # composite ops (e.g. some attention backends) decompose into ops that have formulas
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
            self.atomic.add(func)
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        if self.count._model_depth:
            self.count.add(int(flop_registry[packet](*args, **kwargs, out_val=out)))
        return out


def _is_diffusion_model(module) -> bool:
    import comfy.model_management
    for loaded in comfy.model_management.current_loaded_models:
        patcher = loaded.model
        if patcher is not None and getattr(getattr(patcher, "model", None), "diffusion_model", None) is module:
            return True
    return False


def _block_kinds() -> tuple:
    import comfy.ldm.flux.layers
    import comfy.ldm.wan.model
    return (comfy.ldm.wan.model.WanAttentionBlock, comfy.ldm.flux.layers.DoubleStreamBlock,
            comfy.ldm.flux.layers.SingleStreamBlock)


@contextlib.contextmanager
def counting_flops():
    """Counts the diffusion-model FLOPs of everything run inside; yields the FlopCount."""
    count = FlopCount()
    blocks = _block_kinds()
    stack: list = []  # what each open module call changed: ("model" | "block" | None)

    def before(module, args, kwargs=None):
        if count._model_depth == 0 and not _is_diffusion_model(module):
            role = None
        elif count._model_depth == 0:
            role = "model"
            count._model_depth += 1
            count.model_calls += 1
        elif isinstance(module, blocks):
            role = "block"
            count._block_depth += 1
        else:
            role = None
        stack.append(role)

    def after(module, args, output):
        role = stack.pop() if stack else None
        if role == "model":
            count._model_depth -= 1
        elif role == "block":
            count._block_depth -= 1

    pre = torch.nn.modules.module.register_module_forward_pre_hook(before)
    post = torch.nn.modules.module.register_module_forward_hook(after, always_call=True)
    try:
        with _CountingMode(count):
            yield count
    finally:
        pre.remove()
        post.remove()

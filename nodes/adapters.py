"""One description per architecture: its block kinds, their hidden streams, and its TeaCache indicator.

Everything else (hooks, the engine) is shared. A family is supported at block sites when its
forward offers `patches_replace["dit"]` for every block; the whole-model site works on any model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass(frozen=True)
class BlockKind:
    name: str  # key used by the model in patches_replace["dit"][(name, i)]
    attribute: str  # the ModuleList on the diffusion model
    streams: tuple  # hidden-state entries of the replace args / returned dict


@dataclass(frozen=True)
class Adapter:
    family: str
    key: str  # the family's key in the policies' per-family defaults (cache_core.policies)
    model_class: str  # module.qualname of the diffusion model class
    kinds: tuple
    modulated_input: Optional[Callable] = None  # (block module, args) -> timestep-modulated input of block 0

    def layout(self, diffusion_model) -> list[tuple[str, int]]:
        return [(k.name, len(getattr(diffusion_model, k.attribute))) for k in self.kinds]

    def streams(self) -> dict:
        return {k.name: k.streams for k in self.kinds}

    def block(self, diffusion_model, kind: str, index: int):
        attribute = next(k.attribute for k in self.kinds if k.name == kind)
        return getattr(diffusion_model, attribute)[index]


def _flux_modulated_input(block, args) -> torch.Tensor:
    """TeaCache's indicator for Flux: the image stream after norm1 and the first modulation."""
    mod, _ = block.img_mod(args["vec"])
    return block.img_norm1(args["img"]) * (1 + mod.scale) + mod.shift


def _wan_modulated_input(block, args) -> torch.Tensor:
    """TeaCache's indicator for Wan: norm1(x) * (1 + scale) + shift from the block's modulation table."""
    e = args["vec"]
    table = block.modulation.to(dtype=e.dtype, device=e.device)
    if e.ndim == 4:  # [B, L, 6, dim]
        mod = table.unsqueeze(0) + e
        shift, scale = mod[:, :, 0], mod[:, :, 1]
    else:  # [B, 6, dim]
        mod = table + e
        shift, scale = mod[:, 0:1], mod[:, 1:2]
    return block.norm1(args["img"]) * (1 + scale) + shift


ADAPTERS = (
    Adapter(
        family="Flux",
        key="flux",
        model_class="comfy.ldm.flux.model.Flux",
        kinds=(BlockKind("double_block", "double_blocks", ("img", "txt")),
               BlockKind("single_block", "single_blocks", ("img",))),
        modulated_input=_flux_modulated_input,
    ),
    Adapter(
        family="Wan 2.1 / 2.2",
        key="wan",
        model_class="comfy.ldm.wan.model.WanModel",
        kinds=(BlockKind("double_block", "blocks", ("img",)),),
        modulated_input=_wan_modulated_input,
    ),
)


class UnsupportedModel(ValueError):
    pass


def adapter_for(diffusion_model) -> Adapter:
    cls = type(diffusion_model)
    name = f"{cls.__module__}.{cls.__qualname__}"
    for adapter in ADAPTERS:
        if adapter.model_class == name:
            return adapter
    families = ", ".join(a.family for a in ADAPTERS)
    raise UnsupportedModel(
        f"block-level caching does not support this model ({cls.__name__}) yet; supported families: {families}. "
        "Use the 'model' site, which works on any model.")

"""One description per architecture: its block kinds, their hidden streams and tokens, and its TeaCache indicator.

Everything else (hooks, the engine) is shared. A family is supported at block sites when its
forward offers `patches_replace["dit"]` for every block; the whole-model site works on any model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..cache_core import TokenLayout


@dataclass(frozen=True)
class BlockKind:
    name: str  # key used by the model in patches_replace["dit"][(name, i)]
    attribute: str  # the ModuleList on the diffusion model
    streams: tuple  # hidden-state entries of the replace args / returned dict
    tokens: Optional[TokenLayout] = None  # where the image/video tokens are (token-level recompute)


@dataclass(frozen=True)
class Adapter:
    family: str
    model_class: str  # module.qualname of the diffusion model class
    kinds: tuple
    modulated_input: Optional[Callable] = None  # (block module, args) -> timestep-modulated input of block 0

    def layout(self, diffusion_model) -> list[tuple[str, int]]:
        return [(k.name, len(getattr(diffusion_model, k.attribute))) for k in self.kinds]

    def streams(self) -> dict:
        return {k.name: k.streams for k in self.kinds}

    def token_layouts(self) -> dict:
        missing = [k.name for k in self.kinds if k.tokens is None]
        if missing:
            raise UnsupportedModel(
                f"token-level recompute cannot gather the tokens of this model's {', '.join(missing)} blocks "
                f"({self.family}) yet: disconnect the tokens input")
        return {k.name: k.tokens for k in self.kinds}

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


_FLUX_ROWS = (("pe", 2), ("attn_mask", (-2, -1)))

ADAPTERS = (
    Adapter(
        family="Flux",
        model_class="comfy.ldm.flux.model.Flux",
        # pe: the rotary table [B, 1, txt + img, ...] of cat(txt, img); single blocks see cat(txt, img)
        kinds=(BlockKind("double_block", "double_blocks", ("img", "txt"),
                         TokenLayout("img", text="txt", rows=_FLUX_ROWS)),
               BlockKind("single_block", "single_blocks", ("img",),
                         TokenLayout("img", text="txt", text_in_stream=True, rows=_FLUX_ROWS))),
        modulated_input=_flux_modulated_input,
    ),
    Adapter(
        family="Wan 2.1 / 2.2",
        model_class="comfy.ldm.wan.model.WanModel",
        # pe: freqs [1, img, 1, ...]; vec: modulation [B, 1 | frames | img, 6, dim] (per-frame rows cover a frame)
        kinds=(BlockKind("double_block", "blocks", ("img",), TokenLayout("img", rows=(("pe", 1), ("vec", 1)))),),
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

"""One description per architecture: block kinds, hidden streams, image-token grid and TeaCache indicator.

Everything else (hooks, the engine) is shared. A family is supported at block sites when its
forward offers `patches_replace["dit"]` for every block; the whole-model site works on any model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..cache_core import TokenGrid, TokenLayout


@dataclass(frozen=True)
class BlockKind:
    name: str  # key used by the model in patches_replace["dit"][(name, i)]
    attribute: str  # the ModuleList on the diffusion model
    streams: tuple  # hidden-state entries of the replace args / returned dict
    image_streams: tuple = ()  # streams whose last rows are the image tokens (Flux single blocks: cat(txt, img))
    # token-level recompute: the args entry whose length is the text token count (when the image stream is
    # cat(text, image), the text precedes the tokens there), and the per-position tables (entry, dims) over
    # text + image tokens that a token subset must gather; None: this kind's tokens cannot be gathered
    text: Optional[str] = None
    token_rows: Optional[tuple] = None


@dataclass(frozen=True)
class Adapter:
    family: str
    model_class: str  # module.qualname of the diffusion model class
    kinds: tuple
    modulated_input: Optional[Callable] = None  # (block module, args) -> timestep-modulated input of block 0
    patch: tuple = ()  # latent elements per image token along each spatial dim; () = grid unknown

    def layout(self, diffusion_model) -> list[tuple[str, int]]:
        return [(k.name, len(getattr(diffusion_model, k.attribute))) for k in self.kinds]

    def streams(self) -> dict:
        return {k.name: k.streams for k in self.kinds}

    @property
    def has_token_grid(self) -> bool:
        return bool(self.patch)

    def token_grid(self, kind: str, stream: str, latent_shape: Optional[tuple]) -> Optional[TokenGrid]:
        """The grid of the image tokens in `stream` of `kind` blocks, for a latent [B, C, *spatial]; None if none."""
        block_kind = next(k for k in self.kinds if k.name == kind)
        if not self.patch or latent_shape is None or stream not in block_kind.image_streams:
            return None
        return TokenGrid(tuple(-(-n // p) for n, p in zip(latent_shape[2:], self.patch)))

    def token_layouts(self) -> dict:
        """Per kind, where token-level recompute gathers its token subset; raises when a kind does not say."""
        missing = [k.name for k in self.kinds if k.token_rows is None or not k.image_streams]
        if missing:
            raise UnsupportedModel(
                f"Feature cache: token-level recompute cannot gather the tokens of this model's {', '.join(missing)} blocks "
                f"({self.family}) yet: disconnect the tokens input")
        return {k.name: TokenLayout(k.image_streams[0], k.text, k.text is not None and k.text not in k.streams,
                                    k.token_rows) for k in self.kinds}

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
        kinds=(BlockKind("double_block", "double_blocks", ("img", "txt"), image_streams=("img",), text="txt",
                         token_rows=_FLUX_ROWS),
               BlockKind("single_block", "single_blocks", ("img",), image_streams=("img",), text="txt",
                         token_rows=_FLUX_ROWS)),
        modulated_input=_flux_modulated_input,
        patch=(2, 2),
    ),
    Adapter(
        family="Wan 2.1 / 2.2",
        model_class="comfy.ldm.wan.model.WanModel",
        # pe: freqs [1, img, 1, ...]; vec: modulation [B, 1 | frames | img, 6, dim] (per-frame rows cover a frame)
        kinds=(BlockKind("double_block", "blocks", ("img",), image_streams=("img",),
                         token_rows=(("pe", 1), ("vec", 1))),),
        modulated_input=_wan_modulated_input,
        patch=(1, 2, 2),
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

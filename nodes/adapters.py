"""One description per architecture: block kinds, hidden streams, image-token grid and TeaCache indicator.

Everything else (hooks, the engine) is shared. Two ways into the blocks, both from the host's public
surface and both reversible:
- `REPLACE`: the forward offers `patches_replace["dit"][(kind, i)]` for every block (Flux, Wan, ...);
  the args dict it passes is the block's input, the dict returned its output.
- `FORWARD`: the forward has no such hook (Lumina2, HiDream, Cosmos, PixArt). For the duration of one
  model call the block modules get an instance attribute `forward` that routes the call through the
  engine and on to the class's own forward; it is deleted in `finally`. Module and parameter names
  never change (LoRA and lowvram key weights by them). The args dict is the block forward's bound
  arguments by parameter name; `returns` names what the forward returns, in order.
- `SKIP_BRANCH`: U-Nets (SD1.5, SDXL). The same per-call routing, applied to the layers of the deep
  branch below `probe_blocks` shallow blocks on each side (DeepCache; see cache_core.skip_branch).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..cache_core import AttentionLayout, TokenGrid, TokenLayout

REPLACE = "replace"
FORWARD = "forward"
SKIP_BRANCH = "skip_branch"  # U-Nets: DeepCache's deep branch (cache_core.skip_branch), layers routed as FORWARD


@dataclass(frozen=True)
class BlockKind:
    name: str  # key used by the model in patches_replace["dit"][(name, i)], or a row name for FORWARD
    attribute: str  # the ModuleList (or ModuleDict) on the diffusion model
    streams: tuple  # hidden-state entries of the args dict that the block updates
    returns: tuple = ()  # FORWARD: names of the forward's return values; REPLACE: () (a dict comes back)
    image_streams: tuple = ()  # streams whose last rows are the image tokens (Flux single blocks: cat(txt, img))
    # token-level recompute: the args entry whose length is the text token count (when the image stream is
    # cat(text, image), the text precedes the tokens there), and the per-position tables (entry, dims) over
    # text + image tokens that a token subset must gather; None: this kind's tokens cannot be gathered
    text: Optional[str] = None
    token_rows: Optional[tuple] = None
    attention: Optional[AttentionLayout] = None  # where its self-attention sees the positions (cached keys/values)


@dataclass(frozen=True)
class Adapter:
    family: str
    model_classes: tuple  # module.qualname of the diffusion model classes it describes
    kinds: tuple
    modulated_input: Optional[Callable] = None  # (block module, args) -> timestep-modulated input of block 0
    hook: str = REPLACE
    patch: tuple = ()  # latent elements per image token along each spatial dim; () = grid unknown
    patch_attribute: str = ""  # the model's own patch size attribute, when it varies within the family (Flux 2)
    key: str = ""  # the family's key in the policies' per-family defaults (cache_core.policies); "" = none

    def blocks(self, diffusion_model, kind: BlockKind) -> list:
        container = getattr(diffusion_model, kind.attribute)
        if isinstance(container, torch.nn.ModuleDict):
            return list(container.values())
        if isinstance(container, torch.nn.ModuleList):
            return list(container)
        return [] if container is None else [container]  # a single block (a U-Net's middle block, maybe absent)

    def layout(self, diffusion_model) -> list[tuple[str, int]]:
        return [(k.name, len(self.blocks(diffusion_model, k))) for k in self.kinds]

    def streams(self) -> dict:
        return {k.name: k.streams for k in self.kinds}

    def kind(self, name: str) -> BlockKind:
        return next(k for k in self.kinds if k.name == name)

    @property
    def has_token_grid(self) -> bool:
        return bool(self.patch)

    def patch_of(self, diffusion_model) -> tuple:
        if not self.patch_attribute:
            return self.patch
        size = getattr(diffusion_model, self.patch_attribute)
        return tuple(size) if isinstance(size, (list, tuple)) else (size,) * len(self.patch)

    def latent_grid(self, latent_shape: Optional[tuple], patch: Optional[tuple] = None) -> Optional[TokenGrid]:
        """The image-token grid of a latent [B, C, *spatial]; None where the patch or the latent is unknown.

        `patch`: the model's own (`patch_of`), where the family's varies."""
        patch = patch or self.patch
        if not patch or latent_shape is None:
            return None
        return TokenGrid(tuple(-(-n // p) for n, p in zip(latent_shape[2:], patch)))

    def token_grid(self, kind: str, stream: str, latent_shape: Optional[tuple],
                   patch: Optional[tuple] = None) -> Optional[TokenGrid]:
        """The grid of the image tokens in `stream` of `kind` blocks (`latent_grid`); None if it holds none."""
        return self.latent_grid(latent_shape, patch) if stream in self.kind(kind).image_streams else None

    def token_layouts(self) -> dict:
        """Per kind, where token-level recompute gathers its token subset; raises when a kind does not say."""
        missing = [k.name for k in self.kinds if k.token_rows is None or not k.image_streams]
        if missing:
            raise UnsupportedModel(
                f"Feature cache: token-level recompute cannot gather the tokens of this model's "
                f"{', '.join(missing)} blocks ({self.family}) yet: disconnect the tokens input")
        return {k.name: TokenLayout(k.image_streams[0], k.text, k.text is not None and k.text not in k.streams,
                                    k.token_rows, k.attention) for k in self.kinds}

    def block(self, diffusion_model, kind: str, index: int):
        return self.blocks(diffusion_model, self.kind(kind))[index]


def _flux_modulated_input(block, args) -> torch.Tensor:
    """TeaCache's indicator for Flux: the image stream after norm1 and the first modulation.

    Flux 2 (global modulation) passes the blocks their modulations, computed once, as args["vec"]."""
    if hasattr(block, "img_mod"):
        mod, _ = block.img_mod(args["vec"])
    else:
        (mod, _), _ = args["vec"]
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


# Image tokens and their grid (`image_streams`, `patch`) are described where every block of the family
# sees the image tokens last and nothing else after them; families that append reference, motion or
# padding tokens (Qwen-Image Edit, Wan S2V, Lumina's padded sequences, ...) leave the grid unknown.
_DOUBLE_SINGLE = (BlockKind("double_block", "double_blocks", ("img", "txt"), image_streams=("img",)),
                  BlockKind("single_block", "single_blocks", ("img",), image_streams=("img",)))  # cat(txt, img)
_WAN = "comfy.ldm.wan.model."
# Token-level recompute (token_rows) is described for Flux and Wan, whose block args were checked:
# Flux pe is the rotary table [B, 1, txt + img, ...] of cat(txt, img) (single blocks see cat(txt, img));
# Wan pe is freqs [1, img, 1, ...], vec the modulation [B, 1 | frames | img, 6, dim].
# Self-attention (each block's first attention call; Wan's second is cross-attention): Flux attends over
# cat(txt, img) with q, k, v [B, heads, positions, head_dim] and a mask [..., queries, keys]; Wan over the
# image tokens with q, k, v [B, positions, heads * head_dim].
_FLUX_ROWS = (("pe", 2), ("attn_mask", (-2, -1)))
_FLUX_ATTENTION = AttentionLayout(sequence_dim=2, key_rows=(("attn_mask", -1),))
_FLUX_BLOCKS = (BlockKind("double_block", "double_blocks", ("img", "txt"), image_streams=("img",), text="txt",
                          token_rows=_FLUX_ROWS, attention=_FLUX_ATTENTION),
                BlockKind("single_block", "single_blocks", ("img",), image_streams=("img",), text="txt",
                          token_rows=_FLUX_ROWS, attention=_FLUX_ATTENTION))
_WAN_BLOCKS = (BlockKind("double_block", "blocks", ("img",), image_streams=("img",),
                         token_rows=(("pe", 1), ("vec", 1)), attention=AttentionLayout(sequence_dim=1)),)

ADAPTERS = (
    Adapter("Flux (incl. Kontext, Flux 2)", ("comfy.ldm.flux.model.Flux",), _FLUX_BLOCKS,
            modulated_input=_flux_modulated_input, patch=(2, 2), patch_attribute="patch_size", key="flux"),
    Adapter("Chroma", ("comfy.ldm.chroma.model.Chroma",), _DOUBLE_SINGLE, patch=(2, 2)),
    Adapter("Chroma Radiance", ("comfy.ldm.chroma_radiance.model.ChromaRadiance",), _DOUBLE_SINGLE, patch=(16, 16)),
    # HunyuanVideo's single blocks see cat(img, txt), and its patch differs between video and HunyuanImage.
    Adapter("HunyuanVideo / HunyuanImage", ("comfy.ldm.hunyuan_video.model.HunyuanVideo",),
            (BlockKind("double_block", "double_blocks", ("img", "txt")),
             BlockKind("single_block", "single_blocks", ("img",))), modulated_input=_flux_modulated_input,
            key="hunyuan_video"),
    Adapter("Wan 2.1 / 2.2 (T2V, I2V, VACE, Fun/camera)",
            (_WAN + "WanModel", _WAN + "VaceWanModel", _WAN + "CameraWanModel"), _WAN_BLOCKS,
            modulated_input=_wan_modulated_input, patch=(1, 2, 2), key="wan"),
    Adapter("Wan 2.2 S2V / HuMo / Animate",  # their blocks also see reference, motion or audio tokens
            (_WAN + "WanModel_S2V", _WAN + "HumoWanModel", "comfy.ldm.wan.model_animate.AnimateWanModel"),
            (BlockKind("double_block", "blocks", ("img",)),), modulated_input=_wan_modulated_input, key="wan"),
    Adapter("SD3 / SD3.5 (MMDiT)", ("comfy.ldm.modules.diffusionmodules.mmdit.OpenAISignatureMMDITWrapper",),
            (BlockKind("double_block", "joint_blocks", ("img", "txt"), image_streams=("img",)),), patch=(2, 2)),
    Adapter("Qwen-Image (incl. Edit)", ("comfy.ldm.qwen_image.model.QwenImageTransformer2DModel",),
            (BlockKind("double_block", "transformer_blocks", ("img", "txt")),)),
    Adapter("LTXV", ("comfy.ldm.lightricks.model.LTXVModel",),
            (BlockKind("double_block", "transformer_blocks", ("img",)),)),
    Adapter("Mochi", ("comfy.ldm.genmo.joint_model.asymm_models_joint.AsymmDiTJoint",),
            (BlockKind("double_block", "blocks", ("img", "txt"), image_streams=("img",)),), patch=(1, 2, 2)),
    Adapter("AuraFlow", ("comfy.ldm.aura.mmdit.MMDiT",),
            (BlockKind("double_block", "double_layers", ("img", "txt"), image_streams=("img",)),
             BlockKind("single_block", "single_layers", ("img",), image_streams=("img",))), patch=(2, 2)),
    Adapter("HunyuanDiT", ("comfy.ldm.hydit.models.HunYuanDiT",),
            (BlockKind("double_block", "blocks", ("img",), image_streams=("img",)),), patch=(2, 2)),
    # No block replace hook in these forwards: the block modules' forward is routed for the call.
    Adapter("Lumina 2 / Z-Image", ("comfy.ldm.lumina.model.NextDiT",),
            (BlockKind("layer", "layers", ("x",), returns=("x",)),), hook=FORWARD),
    Adapter("HiDream", ("comfy.ldm.hidream.model.HiDreamImageTransformer2DModel",),
            (BlockKind("double_block", "double_stream_blocks", ("image_tokens", "text_tokens"),
                       returns=("image_tokens", "text_tokens")),
             BlockKind("single_block", "single_stream_blocks", ("image_tokens",), returns=("image_tokens",))),
            hook=FORWARD),
    # Kandinsky 5 has a replace hook, but in ComfyUI 0.8.0 its original_block calls the block with argument
    # names the block does not take, so any replace patch fails there: route the block forward instead.
    Adapter("Kandinsky 5", ("comfy.ldm.kandinsky5.model.Kandinsky5",),
            (BlockKind("visual_block", "visual_transformer_blocks", ("visual_embed",), returns=("visual_embed",),
                       image_streams=("visual_embed",)),), hook=FORWARD, patch=(1, 2, 2)),
    Adapter("Cosmos Predict2", ("comfy.ldm.cosmos.predict2.MiniTrainDIT",),
            (BlockKind("block", "blocks", ("x_B_T_H_W_D",), returns=("x_B_T_H_W_D",)),), hook=FORWARD),
    Adapter("PixArt", ("comfy.ldm.pixart.pixartms.PixArtMS",),
            (BlockKind("block", "blocks", ("x",), returns=("x",), image_streams=("x",)),), hook=FORWARD,
            patch=(2, 2)),
    Adapter("SD1.5 / SDXL U-Net (DeepCache, 'span' site)",
            ("comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel",),
            (BlockKind("input", "input_blocks", ("h",)), BlockKind("middle", "middle_block", ("h",)),
             BlockKind("output", "output_blocks", ("h",))), hook=SKIP_BRANCH),
)


class UnsupportedModel(ValueError):
    pass


class HostDrift(RuntimeError):
    pass


def class_name(obj) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def adapter_for(diffusion_model) -> Adapter:
    name = class_name(diffusion_model)
    for adapter in ADAPTERS:
        if name in adapter.model_classes:
            return adapter
    families = "; ".join(a.family for a in ADAPTERS)
    raise UnsupportedModel(
        f"block-level caching does not support this model ({type(diffusion_model).__name__}) yet; supported "
        f"families: {families}. Use the 'model' site, which works on any model.")


def check_host(adapter: Adapter, diffusion_model, host_version: str) -> None:
    """Fails before sampling when the host's class no longer has what the description relies on."""
    for kind in adapter.kinds:
        container = getattr(diffusion_model, kind.attribute, None)
        single_block_allowed = adapter.hook == SKIP_BRANCH and (
            container is None or isinstance(container, torch.nn.Module))
        if not hasattr(diffusion_model, kind.attribute) or not (
                single_block_allowed or isinstance(container, (torch.nn.ModuleList, torch.nn.ModuleDict))):
            raise HostDrift(
                f"host drift: the {adapter.family} adapter expects the block list '{kind.attribute}' on "
                f"{type(diffusion_model).__name__}, which ComfyUI {host_version} does not have. Use the 'model' "
                "site, or a ComfyUI version this pack supports.")
        if adapter.hook == FORWARD:
            for block in adapter.blocks(diffusion_model, kind)[:1]:
                parameters = inspect.signature(type(block).forward).parameters
                missing = [s for s in kind.streams if s not in parameters]
                if missing:
                    raise HostDrift(
                        f"host drift: the {adapter.family} adapter expects {type(block).__name__}.forward to take "
                        f"'{missing[0]}' (in '{kind.attribute}'), which ComfyUI {host_version} does not. Use the "
                        "'model' site, or a ComfyUI version this pack supports.")

"""Block-level coverage of every model family the adapters describe, on the host in use.

Each family is built in a tiny configuration with the host's own classes (random seeded weights),
then sampled a few steps through the host's sampler (comfy.sample.sample, what KSampler runs) at
every site its adapter claims. A site is "ok" when
- speed 0 gives a latent bit-identical to the model without the cache,
- a fixed interval of 2 computes fewer block module calls than the plain model and its report says so,
- afterwards no block module keeps a routed `forward`.
Families the host does not have are "n/a" at every site.

    python -m benchmarks.coverage [--families A,B]      # writes out/coverage.json, prints the matrix
    COMFYUI_PATH=$HOME/ComfyUI-0.8 python -m benchmarks.coverage
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from benchmarks.fixtures import build_flux, flux_config, random_init_

SITES = ("model", "span", "blocks")
STEPS = 4
OK, FAIL, NA = "ok", "fail", "n/a"


@dataclass(frozen=True)
class Family:
    """How to build one family tiny: the host's model config class, its unet_config, and its inputs."""

    config_class: str  # name in comfy.supported_models
    unet_config: dict
    latent: tuple  # latent shape, batch 1
    context: tuple  # text embedding shape, batch 1
    extra: dict = field(default_factory=dict)  # conditioning extras: name -> shape (tensor) or value
    build: Optional[Callable] = None  # custom builder (config) -> model_base.BaseModel
    params: str = ""  # module.qualname of the parameter dataclass, when the host's version adds fields ...
    newer: dict = field(default_factory=dict)  # ... these are passed only where that dataclass has them


# Two levels, one res block each (SDXL's config fixes 64 channels per attention head).
_TINY_UNET = dict(use_checkpoint=False, image_size=32, in_channels=4, out_channels=4, model_channels=64,
                  num_res_blocks=[1, 1], channel_mult=[1, 2], transformer_depth=[1, 1], transformer_depth_middle=1,
                  transformer_depth_output=[1, 1, 1, 1], use_spatial_transformer=True, legacy=False,
                  use_linear_in_transformer=False, use_temporal_resblock=False, use_temporal_attention=False)

_TINY_FLUX = flux_config(hidden_size=64, num_heads=2, depth=2, depth_single_blocks=2)
_TINY_QWEN = dict(image_model="qwen_image", patch_size=2, in_channels=64, out_channels=16, num_layers=3,
                  attention_head_dim=32, num_attention_heads=2, joint_attention_dim=64, axes_dims_rope=(8, 12, 12))

FAMILIES = {
    "Flux": Family("Flux", _TINY_FLUX,
                   (1, 16, 8, 8), (1, 8, 64), {"pooled_output": (1, 32), "guidance": 3.5}, build=build_flux),
    "Flux Kontext": Family("Flux", _TINY_FLUX,
                           (1, 16, 8, 8), (1, 8, 64), {"pooled_output": (1, 32), "guidance": 3.5,
                                                       "reference_latents": [(1, 16, 8, 8)]}, build=build_flux),
    "Flux 2": Family("Flux2", dict(
        image_model="flux2", in_channels=128, out_channels=128, patch_size=1, vec_in_dim=None, context_in_dim=64,
        hidden_size=64, mlp_ratio=3.0, num_heads=2, depth=2, depth_single_blocks=2, axes_dim=[8, 8, 8, 8], theta=2000,
        qkv_bias=False, guidance_embed=True, txt_ids_dims=[3], global_modulation=True, mlp_silu_act=True,
        ops_bias=False, default_ref_method="index", ref_index_scale=10.0), (1, 128, 4, 4), (1, 8, 64),
        {"guidance": 3.5, "pooled_output": (1, 32)}),
    "Chroma": Family("Chroma", dict(
        image_model="chroma", in_channels=64, out_channels=64, context_in_dim=64, hidden_size=64, mlp_ratio=4.0,
        num_heads=2, depth=2, depth_single_blocks=2, axes_dim=[8, 12, 12], theta=10000, patch_size=2, qkv_bias=True,
        in_dim=64, out_dim=64, hidden_dim=64, n_layers=1), (1, 16, 8, 8), (1, 8, 64), {"pooled_output": (1, 32)},
        params="comfy.ldm.chroma.model.ChromaParams", newer=dict(txt_ids_dims=[], vec_in_dim=None)),
    "Chroma Radiance": Family("ChromaRadiance", dict(
        image_model="chroma_radiance", in_channels=3, out_channels=3, context_in_dim=64, hidden_size=64, mlp_ratio=4.0,
        num_heads=2, depth=2, depth_single_blocks=2, axes_dim=[8, 12, 12], theta=10000, patch_size=16, qkv_bias=True,
        in_dim=64, out_dim=64, hidden_dim=64, n_layers=1, nerf_hidden_size=32, nerf_mlp_ratio=2, nerf_depth=2,
        nerf_max_freqs=4, nerf_tile_size=0, nerf_final_head_type="linear", nerf_embedder_dtype=None),
        (1, 3, 32, 32), (1, 8, 64), {"pooled_output": (1, 32)},
        params="comfy.ldm.chroma_radiance.model.ChromaRadianceParams",
        newer=dict(txt_ids_dims=[], vec_in_dim=None, use_x0=False)),
    "SD3": Family("SD3", dict(
        in_channels=16, out_channels=16, patch_size=2, depth=2, adm_in_channels=32, pos_embed_max_size=16,
        context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 64, "out_features": 128}},
        num_patches=256, pos_embed_scaling_factor=None, pos_embed_offset=None, qk_norm=None,
        x_block_self_attn_layers=[],
        context_size=4096), (1, 16, 8, 8), (1, 8, 64), {"pooled_output": (1, 32)}),
    "HunyuanVideo": Family("HunyuanVideo", dict(
        image_model="hunyuan_video", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=64, hidden_size=64,
        mlp_ratio=4.0, num_heads=2, depth=2, depth_single_blocks=2, axes_dim=[8, 12, 12], theta=256,
        patch_size=[1, 2, 2],
        qkv_bias=True, guidance_embed=True, byt5=False, meanflow=False), (1, 16, 1, 8, 8), (1, 8, 64),
        {"pooled_output": (1, 32), "guidance": 3.5}, params="comfy.ldm.hunyuan_video.model.HunyuanVideoParams",
        newer=dict(use_cond_type_embedding=False, vision_in_dim=None, meanflow_sum=False)),
    "HunyuanImage 2.1": Family("HunyuanImage21", dict(
        image_model="hunyuan_video", in_channels=64, out_channels=64, vec_in_dim=None, context_in_dim=64,
        hidden_size=64,
        mlp_ratio=4.0, num_heads=2, depth=2, depth_single_blocks=2, axes_dim=[16, 16], theta=256, patch_size=[1, 1],
        qkv_bias=True, guidance_embed=False, byt5=False, meanflow=False), (1, 64, 8, 8), (1, 8, 64),
        {"pooled_output": (1, 32)}, params="comfy.ldm.hunyuan_video.model.HunyuanVideoParams",
        newer=dict(use_cond_type_embedding=False, vision_in_dim=None, meanflow_sum=False)),
    "Qwen-Image": Family("QwenImage", _TINY_QWEN, (1, 16, 1, 8, 8), (1, 8, 64)),
    "Qwen-Image Edit": Family("QwenImage", _TINY_QWEN, (1, 16, 1, 8, 8), (1, 8, 64),
        {"reference_latents": [(1, 16, 1, 8, 8)]}),
    "LTXV": Family("LTXV", dict(
        image_model="ltxv", in_channels=128, cross_attention_dim=64, attention_head_dim=32, num_attention_heads=2,
        caption_channels=64, num_layers=3), (1, 128, 2, 4, 4), (1, 8, 64),
        {"frame_rate": 25.0, "attention_mask": (1, 8)}),
    "Mochi": Family("GenmoMochi", dict(
        image_model="mochi_preview", patch_size=2, in_channels=12, hidden_size_x=64, hidden_size_y=32, depth=3,
        num_heads=2, mlp_ratio_x=192.0, mlp_ratio_y=2.0, t5_feat_dim=64, t5_token_length=8, qk_norm=True,
        qkv_bias=False, out_bias=True, patch_embed_bias=True, posenc_preserve_area=True,
        timestep_mlp_bias=True, timestep_scale=1000.0, use_t5=True, learn_sigma=False, attend_to_padding=False,
        use_extended_posenc=False),
        (1, 12, 2, 8, 8), (1, 8, 64), {"attention_mask": (1, 8)}),
    "AuraFlow": Family("AuraFlow", dict(
        in_channels=4, out_channels=4, patch_size=2, dim=64, n_layers=3, n_double_layers=1, n_heads=2,
        global_conddim=64, cond_seq_dim=64, max_seq=64), (1, 4, 8, 8), (1, 8, 64)),
    "Kandinsky 5": Family("Kandinsky5Image", dict(
        image_model="kandinsky5", in_visual_dim=16, out_visual_dim=16, in_text_dim=64, in_text_dim2=32,
        time_dim=32, model_dim=64, ff_dim=128, num_text_blocks=1, num_visual_blocks=3, axes_dims=(8, 12, 12),
        visual_embed_dim=64), (1, 16, 1, 8, 8), (1, 8, 64), {"pooled_output": (1, 32)}),
    "HunyuanDiT": Family("HunyuanDiT", dict(
        image_model="hydit", input_size=[8, 8], patch_size=2, in_channels=4, hidden_size=64, depth=4, num_heads=2,
        text_states_dim=64, text_states_dim_t5=32, text_len=8, text_len_t5=8, learn_sigma=True),
        (1, 4, 8, 8), (1, 8, 64), {"attention_mask": (1, 8), "conditioning_mt5xl": (1, 8, 32),
                                    "attention_mask_mt5xl": (1, 8)}),
    "Wan 2.1 T2V": Family("WAN21_T2V", dict(
        image_model="wan2.1", model_type="t2v", dim=128, ffn_dim=256, freq_dim=256, num_heads=1, num_layers=3,
        in_dim=16, out_dim=16, text_dim=64), (1, 16, 1, 8, 8), (1, 8, 64)),
    "Wan 2.2 5B": Family("WAN22_T2V", dict(
        image_model="wan2.1", model_type="t2v", dim=128, ffn_dim=256, freq_dim=256, num_heads=1, num_layers=3,
        in_dim=48, out_dim=48, text_dim=64), (1, 48, 1, 8, 8), (1, 8, 64)),
    "Wan 2.1 I2V": Family("WAN21_I2V", dict(
        image_model="wan2.1", model_type="i2v", dim=128, ffn_dim=256, freq_dim=256, num_heads=1, num_layers=3,
        in_dim=36, out_dim=16, text_dim=64), (1, 16, 1, 8, 8), (1, 8, 64), {"concat_latent_image": (1, 16, 1, 8, 8)}),
    "Wan VACE": Family("WAN21_Vace", dict(
        image_model="wan2.1", model_type="vace", dim=128, ffn_dim=256, freq_dim=256, num_heads=1, num_layers=4,
        in_dim=16, out_dim=16, text_dim=64, vace_layers=2, vace_in_dim=96), (1, 16, 1, 8, 8), (1, 8, 64)),
    "Wan Fun/camera": Family("WAN21_Camera", dict(
        image_model="wan2.1", model_type="camera", dim=128, ffn_dim=256, freq_dim=256, num_heads=1, num_layers=3,
        in_dim=32, out_dim=16, text_dim=64, in_dim_control_adapter=24), (1, 16, 1, 8, 8), (1, 8, 64),
        {"concat_latent_image": (1, 16, 1, 8, 8)}),
    "Wan 2.2 S2V": Family("WAN22_S2V", dict(
        image_model="wan2.1", model_type="s2v", dim=128, ffn_dim=256, freq_dim=256, num_heads=1, num_layers=3,
        in_dim=16, out_dim=16, text_dim=64, audio_dim=32, num_audio_token=4, cond_dim=16, audio_inject_layers=[0, 2]),
        (1, 16, 1, 8, 8), (1, 8, 64)),
    "Wan HuMo": Family("WAN21_HuMo", dict(
        image_model="wan2.1", model_type="humo", dim=128, ffn_dim=256, freq_dim=256, num_heads=1, num_layers=3,
        in_dim=16, out_dim=16, text_dim=64), (1, 16, 1, 8, 8), (1, 8, 64)),
    "Wan 2.2 Animate": Family("WAN22_Animate", dict(
        image_model="wan2.1", model_type="animate", dim=128, ffn_dim=256, freq_dim=256, num_heads=1, num_layers=3,
        in_dim=36, out_dim=16, text_dim=64, motion_encoder_dim=64), (1, 16, 1, 8, 8), (1, 8, 64),
        {"concat_latent_image": (1, 16, 1, 8, 8)}),
    "Lumina 2": Family("Lumina2", dict(
        image_model="lumina2", patch_size=2, in_channels=16, dim=64, cap_feat_dim=64, n_layers=3, n_heads=2,
        n_kv_heads=2, axes_dims=[8, 12, 12], axes_lens=[300, 64, 64], qk_norm=True, n_refiner_layers=1),
        (1, 16, 8, 8), (1, 8, 64), {"attention_mask": (1, 8)}),
    "Z-Image": Family("ZImage", dict(
        image_model="lumina2", patch_size=2, in_channels=16, dim=256, cap_feat_dim=64, n_layers=3, n_heads=2,
        n_kv_heads=2, axes_dims=[32, 48, 48], axes_lens=[300, 64, 64], qk_norm=True, n_refiner_layers=1,
        rope_theta=256.0, ffn_dim_multiplier=8.0 / 3.0, z_image_modulation=True, time_scale=1000.0),
        (1, 16, 8, 8), (1, 8, 64), {"attention_mask": (1, 8)}),
    "HiDream": Family("HiDream", dict(
        image_model="hidream", patch_size=2, in_channels=16, out_channels=16, num_layers=2, num_single_layers=2,
        attention_head_dim=32, num_attention_heads=2, caption_channels=[64, 64], text_emb_dim=32,
        num_routed_experts=2, num_activated_experts=1, axes_dims_rope=(8, 12, 12), max_resolution=(16, 16),
        llama_layers=[0, 1, 2, 3]), (1, 16, 8, 8), (1, 8, 64),
        {"pooled_output": (1, 32), "conditioning_llama3": (1, 4, 8, 64)}),
    "Cosmos 1": Family("CosmosT2V", dict(
        image_model="cosmos", max_img_h=64, max_img_w=64, max_frames=8, in_channels=16, out_channels=16,
        patch_spatial=2, patch_temporal=1, model_channels=64, block_config="FA-CA-MLP", concat_padding_mask=True,
        pos_emb_cls="rope3d", pos_emb_learnable=False, pos_emb_interpolation="crop", block_x_format="THWBD",
        affline_emb_norm=True, use_adaln_lora=True, adaln_lora_dim=32, num_blocks=3, num_heads=2,
        extra_per_block_abs_pos_emb=True, extra_per_block_abs_pos_emb_type="learnable", crossattn_emb_channels=64),
        (1, 16, 1, 8, 8), (1, 8, 64)),
    "Cosmos Predict2": Family("CosmosT2IPredict2", dict(
        image_model="cosmos_predict2", max_img_h=64, max_img_w=64, max_frames=8, in_channels=16, out_channels=16,
        patch_spatial=2, patch_temporal=1, model_channels=64, num_blocks=3, num_heads=2, crossattn_emb_channels=64,
        pos_emb_cls="rope3d", rope_enable_fps_modulation=False), (1, 16, 1, 8, 8), (1, 8, 64)),
    "PixArt": Family("PixArtAlpha", dict(
        image_model="pixart_alpha", input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=3, num_heads=2,
        caption_channels=64, pe_interpolation=1.0, micro_condition=False, model_max_length=8),
        (1, 4, 40, 40), (1, 8, 64)),  # PixArt's position embedding needs a latent side of at least 40
    "SD1.5 U-Net": Family("SD15", dict(_TINY_UNET, context_dim=64, adm_in_channels=None), (1, 4, 16, 16), (1, 8, 64)),
    "SDXL U-Net": Family("SDXL", dict(_TINY_UNET, context_dim=64, adm_in_channels=2816, num_classes="sequential",
                                               use_linear_in_transformer=True),
                         (1, 4, 16, 16), (1, 8, 64), {"pooled_output": (1, 1280)}),
}


def host_has(family: Family) -> bool:
    """Whether the host in use has the family's model config (Flux 2, Kandinsky 5, Z-Image: v0.8 only)."""
    import comfy.supported_models
    return hasattr(comfy.supported_models, family.config_class)


def build(family: Family, seed: int = 0):
    """A ModelPatcher of the family's tiny model with seeded random weights."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    if family.build is not None:
        model = family.build(family.unet_config)
    else:
        unet_config = dict(family.unet_config)
        if family.params:
            module, name = family.params.rsplit(".", 1)
            fields = {f.name for f in dataclasses.fields(getattr(importlib.import_module(module), name))}
            unet_config.update({k: v for k, v in family.newer.items() if k in fields})
        config = getattr(comfy.supported_models, family.config_class)(unet_config)
        config.set_inference_dtype(torch.float32, None)
        model = config.get_model({})
    state = model.diffusion_model.state_dict()
    model.diffusion_model.load_state_dict(random_init_({k: torch.empty_like(v) for k, v in state.items()}, seed))
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))


def conditioning(family: Family, seed: int, extra: Optional[dict] = None):
    gen = torch.Generator().manual_seed(seed)

    def make(value):
        if isinstance(value, tuple):
            return torch.randn(value, generator=gen)
        if isinstance(value, list):
            return [make(v) for v in value]
        return value
    extras = {}
    for name, value in family.extra.items():
        extras[name] = make(value)
        if name.startswith("attention_mask"):
            extras[name] = torch.ones(value, dtype=torch.long)
    return [[make(family.context), {**extras, **(extra or {})}]]


def sample(model, family: Family, seed: int = 0, extra: Optional[dict] = None):
    """4 Euler steps at cfg 2 through the host's sampler; `extra` is added to both conditionings."""
    import comfy.sample
    latent = torch.zeros(family.latent)
    noise = torch.randn(family.latent, generator=torch.Generator().manual_seed(seed))
    return comfy.sample.sample(model, noise, STEPS, 2.0, "euler", "simple", conditioning(family, 1, extra),
                               conditioning(family, 2, extra), latent, seed=seed, disable_pbar=True)


class BlockCalls:
    """Counts calls of the parametrised modules inside the block lists (a filled block calls none)."""

    def __init__(self, modules):
        self.count = 0
        self.handles = [m.register_forward_pre_hook(self._hook) for m in modules]

    def _hook(self, module, args):
        self.count += 1

    def close(self):
        for h in self.handles:
            h.remove()


def block_modules(adapter, diffusion_model) -> list:
    blocks = [b for kind in adapter.kinds for b in adapter.blocks(diffusion_model, kind)]
    return [m for b in blocks for m in b.modules() if m is not b and any(True for _ in m.parameters(recurse=False))]


def _product():
    """The product's modules as the host's loader imported them."""
    from benchmarks import host
    found = {}
    root = os.path.realpath(host.REPO_ROOT)
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None)
        if file and os.path.realpath(file) in (os.path.join(root, "nodes", "integration.py"),
                                               os.path.join(root, "nodes", "adapters.py")):
            found[os.path.basename(file)[:-3]] = module
    return found["integration"], found["adapters"]


def run_family(name: str, family: Family, integration, adapters, core) -> tuple[dict, list]:
    results, errors = {}, []
    model = build(family)
    diffusion_model = model.model.diffusion_model
    try:
        adapter = adapters.adapter_for(diffusion_model)
    except adapters.UnsupportedModel as error:
        adapter = None
        errors.append(f"{name}: {error}")
    calls = BlockCalls(block_modules(adapter, diffusion_model)) if adapter else None
    try:
        baseline = sample(model, family)
        plain_calls = calls.count if calls else 0
        for site in SITES:
            unclaimed = adapter is None or (site == "blocks" and adapter.hook == adapters.SKIP_BRANCH)
            if site != "model" and unclaimed:
                results[site] = NA
                continue
            try:
                _check_site(model, family, site, baseline, plain_calls, calls, adapter, integration, core)
                results[site] = OK
            except Exception as error:  # a failing site is recorded, the matrix goes on
                results[site] = FAIL
                errors.append(f"{name} @ {site}: {type(error).__name__}: {error}\n{traceback.format_exc(limit=-3)}")
    finally:
        if calls:
            calls.close()
    return results, errors


def _check_site(model, family, site, baseline, plain_calls, calls, adapter, integration, core):
    probe = 1 if site != "model" else 0
    site_config = core.Site(kind=site, probe_blocks=probe)
    still = core.CacheConfig(policy=core.make_policy(method="teacache", speed=0.0), site=site_config)
    handle = integration.CacheHandle()
    latent = sample(integration.install(model, still, handle), family)
    if not torch.equal(latent, baseline):
        difference = (latent - baseline).abs().max()
        raise AssertionError(f"speed 0 differs from the plain model (max abs diff {difference:.3g})")
    fast = core.CacheConfig(policy=core.make_policy(method="fixed", threshold=2.0, warmup_steps=0), site=site_config)
    before = calls.count if calls else 0
    latent = sample(integration.install(model, fast, handle), family)
    report = handle.last
    if not torch.isfinite(latent).all():
        raise AssertionError("non-finite output")
    if not report["evaluations_filled"] or report["compute_fraction"] >= 1.0:
        raise AssertionError(f"nothing was filled: {report['notes']}")
    if calls is not None:
        used = calls.count - before
        if site != "model" and not used < plain_calls:
            raise AssertionError(f"block modules ran {used} times, as many as without the cache ({plain_calls})")
        leftover = [b for kind in adapter.kinds for b in adapter.blocks(model.model.diffusion_model, kind)
                    if "forward" in b.__dict__]
        if leftover:
            raise AssertionError(f"{len(leftover)} block modules kept a routed forward after sampling")


def run(families=None, out_dir="out") -> dict:
    from benchmarks import host
    host.boot()
    torch.set_num_threads(1)
    integration, adapters = _product()
    core = sys.modules[integration.__package__.rsplit(".", 1)[0] + ".cache_core"]
    matrix, errors, timings = {}, [], {}
    for name, family in FAMILIES.items():
        if families and name not in families:
            continue
        start = time.perf_counter()
        if not host_has(family):
            matrix[name] = {site: NA for site in SITES}
        else:
            try:
                matrix[name], family_errors = run_family(name, family, integration, adapters, core)
                errors += family_errors
            except Exception as error:
                matrix[name] = {site: FAIL for site in SITES}
                errors.append(f"{name}: could not build or sample: {type(error).__name__}: {error}\n"
                              f"{traceback.format_exc(limit=-4)}")
        timings[name] = time.perf_counter() - start
    version = integration.host_version()
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "coverage.json"), "w") as f:
        json.dump(matrix, f, indent=1)
    return {"matrix": matrix, "errors": errors, "host_version": version, "seconds": timings}


def format_matrix(result: dict) -> str:
    matrix = result["matrix"]
    width = max([len("family")] + [len(n) for n in matrix])
    lines = [f"ComfyUI {result['host_version']}",
             f"{'family':<{width}}  " + "  ".join(f"{s:<6}" for s in SITES) + "  seconds"]
    for name, row in matrix.items():
        lines.append(f"{name:<{width}}  " + "  ".join(f"{row[s]:<6}" for s in SITES)
                     + f"  {result['seconds'].get(name, 0):.1f}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", default="", help="comma-separated family names (default: all)")
    parser.add_argument("--out", default="out")
    args = parser.parse_args(argv)
    result = run([f.strip() for f in args.families.split(",") if f.strip()] or None, args.out)
    for error in result["errors"]:
        print(error, file=sys.stderr)
    print(format_matrix(result))
    return 1 if any(v == FAIL for row in result["matrix"].values() for v in row.values()) else 0


if __name__ == "__main__":
    sys.exit(main())

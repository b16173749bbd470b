"""Tiny diffusion models with random weights, and per-label text embeddings, for tests and demos.

They run real ComfyUI model code (Wan 2.1, Flux) at toy sizes so a whole graph takes well under a
second on CPU. Weights are seeded and headers sorted, so every file is byte-identical across runs
and hosts (for a given torch version).
The tiny Wan loads through UNETLoader (ComfyUI detects it from tensor shapes); Flux detection pins
the full model's width, so the tiny Flux carries its config in the file and is built in-process
by the FCFixtureFluxLoader node. ComfyUI modules are imported lazily: boot the host first
(benchmarks.host.boot), which puts it on sys.path and selects the CPU.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os

import torch
from safetensors import safe_open
from safetensors.torch import save

WAN_FILE = "fc_tiny_wan.safetensors"
FLUX_FILE = "fc_tiny_flux.safetensors"
WAN_LABELS_FILE = "fc_tiny_wan_labels.safetensors"
FLUX_LABELS_FILE = "fc_tiny_flux_labels.safetensors"
N_LABELS = 4
LABEL_LENGTH = 8
WAN_TEXT_DIM = 4096  # fixed by ComfyUI's Wan detection (not inferred from the weights)

# Metadata key recording the generator arguments: a file is reused only if they match.
_ARGS_KEY = "fc_fixture_args"
FLUX_CONFIG_KEY = "flux_config"


def random_init_(state_dict: dict, seed: int) -> dict:
    """Fills a state dict in place with seeded weights at scales that keep activations O(1).

    Matrices and convolutions get N(0, 1/fan_in); adaLN modulation tables N(0, 1/dim) as in Wan's
    own init; biases 0; other vectors (norm scales) 1. Zero or uninitialised weights would make
    every prediction trivial.
    """
    gen = torch.Generator().manual_seed(seed)
    for name in sorted(state_dict):
        t = state_dict[name]
        if name.endswith("modulation"):
            value = torch.randn(t.shape, generator=gen) / math.sqrt(t.shape[-1])
        elif t.ndim >= 2:
            value = torch.randn(t.shape, generator=gen) / math.sqrt(math.prod(t.shape[1:]))
        elif name.endswith("bias"):
            value = torch.zeros(t.shape)
        else:
            value = torch.ones(t.shape)
        state_dict[name] = value.to(t.dtype)
    return state_dict


def _args_match(path: str, args: dict) -> bool:
    if not os.path.isfile(path):
        return False
    with safe_open(path, "pt") as f:
        return (f.metadata() or {}).get(_ARGS_KEY) == json.dumps(args, sort_keys=True)


def _sorted_header(data: bytes) -> bytes:
    """safetensors writes metadata in hash order (varies per process); re-emit the JSON header with
    sorted keys so that files are byte-identical. Tensor offsets are relative to the data, so they hold."""
    size = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8:8 + size]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + data[8 + size:]


def _save(tensors: dict, path: str, args: dict, metadata: dict | None = None, verify=None) -> None:
    """Writes to a temporary name, checks it with verify(tmp_path), then renames: concurrent
    processes never read a half-written file and a failed check leaves nothing to reuse."""
    meta = {_ARGS_KEY: json.dumps(args, sort_keys=True), **(metadata or {})}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    root, ext = os.path.splitext(path)
    tmp = f"{root}.{os.getpid()}.tmp{ext}"  # the host picks the file reader by extension
    try:
        with open(tmp, "wb") as f:
            f.write(_sorted_header(save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta)))
        if verify is not None:
            verify(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_tiny_wan(path, dim=128, num_layers=4, ffn_dim=512, in_dim=16, out_dim=16, seed=0,
                   dtype=torch.float16) -> str:
    """A random Wan 2.1 t2v model saved as ComfyUI's UNETLoader expects, verified by loading it.

    ComfyUI infers the config from tensor shapes, except two things it fixes: heads = dim // 128
    (so dim must be a multiple of 128) and the text width 4096 (umT5-XXL), so the text input is 4096-d.
    """
    import comfy.ldm.wan.model
    import comfy.ops
    import comfy.sd

    if dim % 128:
        raise ValueError(f"Wan dim must be a multiple of 128 (ComfyUI infers heads = dim // 128), got {dim}")
    args = dict(model="wan2.1", dim=dim, num_layers=num_layers, ffn_dim=ffn_dim, in_dim=in_dim,
                out_dim=out_dim, seed=seed, dtype=str(dtype))
    if _args_match(path, args):
        return path
    net = comfy.ldm.wan.model.WanModel(model_type="t2v", dim=dim, num_heads=dim // 128, num_layers=num_layers,
                                       ffn_dim=ffn_dim, text_dim=WAN_TEXT_DIM, in_dim=in_dim, out_dim=out_dim,
                                       device="meta", operations=comfy.ops.disable_weight_init)
    sd = random_init_({k: torch.empty(v.shape, dtype=dtype) for k, v in net.state_dict().items()}, seed)
    expected = dict(dim=dim, num_layers=num_layers, ffn_dim=ffn_dim, in_dim=in_dim, out_dim=out_dim)

    def verify(file):
        patcher = comfy.sd.load_diffusion_model(file)
        config = patcher.model.model_config
        detected = {k: config.unet_config.get(k) for k in expected}
        if type(config).__name__ != "WAN21_T2V" or detected != expected:
            raise RuntimeError(f"{path} loads as {type(config).__name__} {detected}, expected WAN21_T2V {expected}")
        loaded = patcher.model.diffusion_model.state_dict()
        if loaded.keys() != sd.keys() or any(not torch.equal(loaded[k].to(dtype), sd[k]) for k in sd):
            raise RuntimeError(f"{path}: the weights UNETLoader loads differ from the ones written")

    _save(sd, path, args, verify=verify)
    return path


def flux_config(hidden_size=256, num_heads=2, depth=2, depth_single_blocks=4, context_in_dim=64,
                vec_in_dim=32) -> dict:
    """A Flux-dev-shaped config (guidance embedding, 16-channel latents, patch 2) at a given size."""
    head_dim = hidden_size // num_heads
    if hidden_size % num_heads or head_dim % 8:
        raise ValueError("hidden_size / num_heads must be an integer multiple of 8")
    # Flux splits the rotary head dim over (index, y, x); keep the real model's 16 for index.
    side = (head_dim - 16) // 2
    return dict(image_model="flux", in_channels=16, out_channels=16, patch_size=2, vec_in_dim=vec_in_dim,
                context_in_dim=context_in_dim, hidden_size=hidden_size, mlp_ratio=4.0, num_heads=num_heads,
                depth=depth, depth_single_blocks=depth_single_blocks, axes_dim=[16, side, side],
                theta=10000, qkv_bias=True, guidance_embed=True)


def build_flux(config: dict, state_dict: dict | None = None, dtype=torch.float32):
    """A ComfyUI Flux model (model_base.BaseModel) from a config, optionally loading weights.

    Fills fields that newer hosts require but older ones reject (txt_ids_dims since v0.8).
    """
    import comfy.ldm.flux.model
    import comfy.supported_models

    config = dict(config)
    fields = {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}
    if "txt_ids_dims" in fields:
        config.setdefault("txt_ids_dims", [])
    model_config = comfy.supported_models.Flux(config)
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({})
    if state_dict is not None:
        expected = model.diffusion_model.state_dict().keys()
        if set(state_dict) != set(expected):
            raise ValueError(f"Flux weights do not match the config: missing {sorted(set(expected) - set(state_dict))[:5]}, "
                             f"unexpected {sorted(set(state_dict) - set(expected))[:5]}")
        model.load_model_weights(dict(state_dict), "")
    return model


def write_tiny_flux(path, hidden_size=256, num_heads=2, depth=2, depth_single_blocks=4, context_in_dim=64,
                    vec_in_dim=32, seed=0) -> str:
    """A random Flux model saved in fp16 with its config as JSON under the "flux_config" metadata key."""
    config = flux_config(hidden_size, num_heads, depth, depth_single_blocks, context_in_dim, vec_in_dim)
    args = dict(model="flux", config=config, seed=seed)
    if _args_match(path, args):
        return path
    shapes = build_flux(config).diffusion_model.state_dict()
    sd = {k: torch.empty(v.shape, dtype=torch.float16) for k, v in shapes.items()}
    _save(random_init_(sd, seed), path, args, {FLUX_CONFIG_KEY: json.dumps(config)})
    return path


def write_label_embeddings(path, n_labels, length, dim, pooled_dim=None, seed=0) -> str:
    """Stand-ins for text-encoder outputs: "labels" [N, L, D] and optionally "pooled" [N, P]."""
    args = dict(model="labels", n_labels=n_labels, length=length, dim=dim, pooled_dim=pooled_dim, seed=seed)
    if _args_match(path, args):
        return path
    gen = torch.Generator().manual_seed(seed)
    tensors = {"labels": torch.randn(n_labels, length, dim, generator=gen)}
    if pooled_dim:
        tensors["pooled"] = torch.randn(n_labels, pooled_dim, generator=gen)
    _save(tensors, path, args)
    return path


def ensure_fixtures(directory) -> dict:
    """Writes (or reuses) the default tiny Wan and Flux and their label embeddings under `directory`.

    The Wan file goes to `directory`/diffusion_models, registered with the host so that UNETLoader
    lists it as "wan_name". Returns the paths: wan, wan_name, wan_labels, flux, flux_labels.
    """
    from benchmarks import host

    directory = os.path.abspath(directory)
    unet_dir = os.path.join(directory, "diffusion_models")
    paths = dict(
        wan=write_tiny_wan(os.path.join(unet_dir, WAN_FILE)),
        wan_name=WAN_FILE,
        wan_labels=write_label_embeddings(os.path.join(directory, WAN_LABELS_FILE), N_LABELS, LABEL_LENGTH,
                                          WAN_TEXT_DIM),
        flux=write_tiny_flux(os.path.join(directory, FLUX_FILE)),
        flux_labels=write_label_embeddings(os.path.join(directory, FLUX_LABELS_FILE), N_LABELS, LABEL_LENGTH,
                                           64, pooled_dim=32, seed=1),
    )
    host.boot(packs=[]).add_model_dir(unet_dir)
    return paths

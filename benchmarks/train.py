"""Train the tiny benchmark models (host Wan 2.1 and host Flux) on generated labelled data.

Caching methods are only meaningful on trained models: a random network's features drift
arbitrarily between steps. Real weights can't be fetched, so this trains tiny models in the
host's OWN architectures and conventions (host BaseModel, its model_sampling, its latent
processing), so that ComfyUI's samplers drive them exactly as they drive real checkpoints.

Conventions (the README in benchmarks/models/ repeats them):
- Latent (VAE space) = benchmarks.latent.image_to_latent(pixels); x0 (model space) =
  base_model.process_latent_in(latent). Wan latents are 5-D [B, 16, T, 16, 16] (T=1 for images).
- Flow matching: x_t = (1 - sigma) * x0 + sigma * noise; the host's apply_model returns the
  denoised x0-prediction and the loss is MSE on velocity (noise - x0), computed from it.
- sigma: half of each batch from the host's model_sampling.sigma(t) with t ~ U(0, 1) (what its
  schedulers visit: Wan shift 8, Flux shift 1.15), half sigma ~ U(0, 1) so low noise levels,
  where shapes get their detail, are seen often enough; clamped to >= 1e-3.
- Conditioning: one fixed random embedding per label, row N (the last) is the null label
  (all zeros, so ConditioningZeroOut also works as the negative); 10 % label dropout to it.
- Flux guidance embedding: guidance ~ U(1, 5) per sample, not distilled (the target ignores
  it), so any usual FluxGuidance value is in distribution. Use real CFG against the null label.
- Weights: EMA (decay 0.995) of the AdamW weights, saved fp16.
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from benchmarks import data
from benchmarks.fixtures import build_flux
from benchmarks.host import comfyui_path
from benchmarks.latent import image_to_latent

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "benchmarks" / "models"
LABEL_TOKENS = 8
NULL_DROPOUT = 0.1

# Exactly what the host's Wan detection infers from the tensor shapes (text_dim is not
# inferred: detection always builds text_dim=4096, so the label context is [8, 4096]).
WAN_CONFIG = {
    "image_model": "wan2.1", "model_type": "t2v", "dim": 128, "out_dim": 16, "num_heads": 1,
    "ffn_dim": 512, "num_layers": 4, "patch_size": (1, 2, 2), "freq_dim": 256,
    "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6, "in_dim": 16,
}
WAN_TEXT_DIM = 4096

# Design's tiny Flux at hidden 256 is 18 MB in fp16 (over the 10 MB budget): hidden 128 with
# one head keeps the head dim (128 = sum of axes_dim) and the 2 double + 4 single blocks.
FLUX_CONFIG = {
    "image_model": "flux", "in_channels": 16, "patch_size": 2, "out_channels": 16,
    "vec_in_dim": 32, "context_in_dim": 64, "hidden_size": 128, "mlp_ratio": 4.0,
    "num_heads": 1, "depth": 2, "depth_single_blocks": 4, "axes_dim": [16, 56, 56],
    "theta": 10000, "qkv_bias": True, "guidance_embed": True,
}
FLUX_POOLED_DIM = 32


def import_host():
    """Put the ComfyUI host first on sys.path (benchmarks.host.comfyui_path), CPU unless CUDA is there."""
    host = comfyui_path()
    if host not in sys.path:
        sys.path.insert(0, host)
    import comfy.cli_args
    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True
    import comfy.model_management  # noqa: F401  (must follow the cpu flag)
    return host


def _init_weights(diffusion_model):
    """Host ops skip weight init (weights start as torch.empty): initialise every tensor here."""
    covered = set()
    for name, m in diffusion_model.named_modules():
        if isinstance(m, nn.Linear):
            nn.Linear.reset_parameters(m)
        elif isinstance(m, (nn.Conv2d, nn.Conv3d)):
            nn.modules.conv._ConvNd.reset_parameters(m)
        elif isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        else:
            continue
        covered.update(f"{name}.{p}" if name else p for p, _ in m.named_parameters(recurse=False))
    with torch.no_grad():
        for name, p in diffusion_model.named_parameters():
            if name in covered:
                continue
            if name.endswith("modulation"):  # Wan adaLN tables
                p.normal_(0.0, p.shape[-1] ** -0.5)
            elif name.endswith("scale"):  # Flux RMSNorm
                p.fill_(1.0)
            else:
                raise RuntimeError(f"no initialiser for {name}")
        for name, m in diffusion_model.named_modules():
            if name in ("head.head", "final_layer.linear"):  # start at zero velocity
                nn.init.zeros_(m.weight)
                nn.init.zeros_(m.bias)


def build_model(kind):
    """The host BaseModel (fp32, CPU) for 'wan' or 'flux', built from its host model config."""
    import_host()
    import comfy.model_detection
    if kind == "flux":
        return build_flux(FLUX_CONFIG)
    model_config = comfy.model_detection.model_config_from_unet_config(dict(WAN_CONFIG))
    model_config.set_inference_dtype(torch.float32, None)
    return model_config.get_model({})


def make_labels(kind, seed):
    """Fixed random label embeddings; the last row (index N) is the all-zero null label."""
    gen = torch.Generator().manual_seed(seed + 12345)
    n = data.NUM_CLASSES
    dim = WAN_TEXT_DIM if kind == "wan" else FLUX_CONFIG["context_in_dim"]
    labels = torch.cat([torch.randn(n, LABEL_TOKENS, dim, generator=gen), torch.zeros(1, LABEL_TOKENS, dim)])
    out = {"labels": labels}
    if kind == "flux":
        out["pooled"] = torch.cat([torch.randn(n, FLUX_POOLED_DIM, generator=gen), torch.zeros(1, FLUX_POOLED_DIM)])
    return out


def sample_sigmas(model_sampling, n, gen):
    """Half from the host's schedule (sigma(t), t ~ U), half uniform in sigma; >= 1e-3."""
    t = torch.rand(n, generator=gen)
    host = model_sampling.sigma(t * getattr(model_sampling, "multiplier", 1.0))
    uniform = torch.rand(n, generator=gen)
    pick = torch.arange(n) % 2 == 0
    return torch.where(pick, host, uniform).clamp(1e-3, 1.0)


def flow_loss(base_model, latent, label_idx, table, gen, guidance=None, motion_weight=0.0):
    """Velocity MSE through the host's apply_model (which returns the denoised prediction).

    motion_weight > 0 (clips) adds the MSE of the error's frame-to-frame differences: same optimum
    (a positive-definite reweighting of the error), more weight on getting the motion right."""
    x0 = base_model.process_latent_in(latent)
    noise = torch.randn(x0.shape, generator=gen)
    sigma = sample_sigmas(base_model.model_sampling, x0.shape[0], gen)
    s = sigma.view(-1, *([1] * (x0.ndim - 1)))
    x_t = (1 - s) * x0 + s * noise
    kwargs = {}
    if "pooled" in table:
        kwargs = {"y": table["pooled"][label_idx], "guidance": guidance}
    # The host's blocks add residuals in place (inference code): saving copies keeps autograd valid.
    with torch.autograd.graph.saved_tensors_hooks(torch.Tensor.clone, lambda t: t):
        denoised = base_model.apply_model(x_t, sigma, c_crossattn=table["labels"][label_idx], **kwargs)
    err = (x_t - denoised) / s - (noise - x0)
    loss = torch.mean(err ** 2)
    if motion_weight:
        loss = loss + motion_weight * torch.mean(torch.diff(err, dim=2) ** 2)
    return loss


def _drop_labels(labels, gen):
    drop = torch.rand(labels.shape[0], generator=gen) < NULL_DROPOUT
    return torch.where(drop, torch.full_like(labels, data.NUM_CLASSES), labels)


def _batch_losses(kind, base_model, table, step, args, gen):
    """Wan: an image batch (T=1) and a clip batch (T=4) every step; Flux: images."""
    seed = args.seed * 1_000_003 + step
    images, labels = data.make_images(args.batch, seed)
    if kind == "wan":
        latent = image_to_latent(images).unsqueeze(2)
        losses = {"img": flow_loss(base_model, latent, _drop_labels(labels, gen), table, gen)}
        clips, clip_labels = data.make_clips(args.clips or args.batch // 2, seed + 500_000_000)
        losses["clip"] = flow_loss(base_model, image_to_latent(clips), _drop_labels(clip_labels, gen), table, gen,
                                   motion_weight=args.motion_weight)
        return losses
    guidance = 1.0 + 4.0 * torch.rand(args.batch, generator=gen)
    return {"img": flow_loss(base_model, image_to_latent(images), _drop_labels(labels, gen), table, gen, guidance)}


def train(kind, args):
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    base_model = build_model(kind)
    net = base_model.diffusion_model
    _init_weights(net)
    if args.init:  # continue from a saved checkpoint (fresh optimiser, EMA restarts from it)
        net.load_state_dict({k: v.float() for k, v in load_file(args.init).items()})
    net.train()
    table = make_labels(kind, args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    ema = {k: v.detach().clone() for k, v in net.state_dict().items()}
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    warmup = min(200, args.steps // 10)

    def lr_at(step):  # linear warmup, cosine decay to 10 %
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    out = Path(args.out)
    log_path = Path(args.log) if args.log else out.with_name(out.stem + ".log.txt")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "w")
    log.write(f"# {kind} {vars(args)} params={sum(p.numel() for p in params)}\n")
    start = time.time()
    running = {}
    for step in range(args.steps):
        losses = _batch_losses(kind, base_model, table, step, args, gen)
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            for k, v in net.state_dict().items():
                ema[k].lerp_(v, 1 - args.ema)
        for k, v in losses.items():
            running[k] = running.get(k, 0.0) + v.item()
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            n = (step % args.log_every) + 1
            parts = " ".join(f"{k}={v / n:.4f}" for k, v in running.items())
            line = f"step {step + 1} {parts} lr={sched.get_last_lr()[0]:.2e} time={time.time() - start:.0f}s"
            print(line, flush=True)
            log.write(line + "\n")
            log.flush()
            running = {}
    elapsed = time.time() - start
    log.write(f"# done in {elapsed:.0f}s\n")
    log.close()
    save(kind, {k: v.to(torch.float16) for k, v in ema.items()}, table, out)
    print(f"saved {out} ({out.stat().st_size / 1e6:.2f} MB) in {elapsed:.0f}s")
    verify(kind, out)


def save(kind, sd, table, out):
    """Checkpoint (diffusion_model keys, as load_model_weights expects) and its label table."""
    out.parent.mkdir(parents=True, exist_ok=True)
    config = WAN_CONFIG if kind == "wan" else FLUX_CONFIG
    key = "wan_config" if kind == "wan" else "flux_config"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out), metadata={key: json.dumps(config)})
    meta = {"classes": json.dumps(data.CLASS_NAMES), "null_index": str(data.NUM_CLASSES)}
    save_file({k: v.contiguous() for k, v in table.items()}, str(labels_path(out)), metadata=meta)


def labels_path(checkpoint):
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.stem + "_labels.safetensors")


def load_labels(checkpoint):
    return load_file(str(labels_path(checkpoint)))


def load_wan(path):
    """The host's UNETLoader path: comfy.sd.load_diffusion_model -> ModelPatcher."""
    import_host()
    import comfy.sd
    return comfy.sd.load_diffusion_model(str(path))


def load_flux(path):
    """Host Flux model config from the "flux_config" metadata, weights via load_model_weights."""
    import_host()
    import comfy.model_management
    import comfy.model_patcher
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        config = json.loads(f.metadata()["flux_config"])
    model = build_flux(config, load_file(str(path)))
    return comfy.model_patcher.ModelPatcher(model, comfy.model_management.get_torch_device(),
                                            comfy.model_management.unet_offload_device())


def verify(kind, path):
    """Reload through the host's paths: same detected config, every weight loaded exactly."""
    import comfy.model_detection
    sd = load_file(str(path))
    if kind == "wan":
        detected = comfy.model_detection.detect_unet_config(sd, "")
        mismatch = {k: (detected.get(k), v) for k, v in WAN_CONFIG.items() if detected.get(k) != v}
        assert not mismatch, f"Wan detection differs: {mismatch}"
        patcher = load_wan(path)
        assert type(patcher.model.model_config).__name__ == "WAN21_T2V", type(patcher.model.model_config)
        assert patcher.model.diffusion_model.text_embedding[0].in_features == WAN_TEXT_DIM
    else:
        patcher = load_flux(path)
    loaded = patcher.model.diffusion_model.state_dict()
    assert set(loaded) == set(sd), set(loaded) ^ set(sd)
    for k, v in sd.items():
        assert torch.equal(loaded[k].to(v.dtype), v), k
    print(f"verified {path}: {type(patcher.model.model_config).__name__}, {len(sd)} tensors, "
          f"{sum(v.numel() for v in sd.values())} parameters")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="kind", required=True)
    for kind, steps, batch in (("wan", 1500, 16), ("flux", 2000, 32)):
        p = sub.add_parser(kind)
        p.add_argument("--steps", type=int, default=steps)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--out", default=str(MODELS / f"tiny_{kind}.safetensors"))
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--log", default=None, help="default: <out stem>.log.txt next to --out")
        p.add_argument("--log-every", type=int, default=50)
        p.add_argument("--batch", type=int, default=batch, help="images per step (Wan: plus --clips clips)")
        if kind == "wan":
            p.add_argument("--clips", type=int, default=None,
                           help="clips per step (default batch/2); more gives motion more of the signal")
            p.add_argument("--motion-weight", type=float, default=0.0,
                           help="clip loss += this * MSE of the error's frame-to-frame differences")
        p.add_argument("--lr", type=float, default=5e-4)
        p.add_argument("--ema", type=float, default=0.995)
        p.add_argument("--init", default=None, help="start from this checkpoint's weights (train longer)")
    args = parser.parse_args(argv)
    train(args.kind, args)


if __name__ == "__main__":
    main()

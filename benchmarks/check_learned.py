"""Check that the tiny benchmark models learned their data: sample per label, classify back.

A checkpoint is only useful for judging caching if it really generates its classes. This samples
through the host's own KSampler path (comfy.sample.sample, Euler, 'simple' schedule, CFG against
the null label), decodes with latent_to_image and assigns every sample to the nearest class
centroid of generated training data (pixels average-pooled to 8x8, which absorbs position
jitter). For Wan clips it also estimates the motion direction (best whole-frame shift between the
first and last frame) and compares it with the class direction. The same classifier is scored on
fresh real data as the ceiling. `--quick` (2 samples per label, 10 steps) takes seconds.
"""
import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from benchmarks import data, train
from benchmarks.latent import latent_to_image

OUT = train.REPO / "out" / "check"
CENTROID_PER_CLASS = 64
MOTION_RANGE = 10
MOTION_MARGIN = 10


def features(pixels):
    """[B, 3, (T,) 32, 32] -> [B, F]: 4x4 average pooling per frame, flattened."""
    if pixels.ndim == 5:
        b, c, t, h, w = pixels.shape
        pixels = pixels.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        return F.avg_pool2d(pixels, 4).reshape(b, -1)
    return F.avg_pool2d(pixels, 4).flatten(1)


def class_centroids(clips, seed):
    labels = torch.arange(data.NUM_CLASSES).repeat(CENTROID_PER_CLASS)
    make = data.make_clips if clips else data.make_images
    pixels, labels = make(len(labels), seed, labels=labels)
    feats = features(pixels)
    return torch.stack([feats[labels == c].mean(0) for c in range(data.NUM_CLASSES)])


def classify(pixels, centroids):
    return torch.cdist(features(pixels), centroids).argmin(1)


def motion_angle(clips):
    """Per clip, the shift (dx, dy) that best maps frame 0 onto the last frame (interior only)."""
    first, last = clips[:, :, 0], clips[:, :, -1]
    m, r = MOTION_MARGIN, MOTION_RANGE
    best = torch.full((clips.shape[0],), float("inf"))
    shift = torch.zeros(clips.shape[0], 2)
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            moved = torch.roll(first, shifts=(dy, dx), dims=(-2, -1))
            err = ((moved - last)[..., m:-m, m:-m] ** 2).mean((1, 2, 3))
            better = err < best
            best = torch.where(better, err, best)
            shift[better] = torch.tensor([float(dx), float(dy)])
    return torch.atan2(shift[:, 1], shift[:, 0])


def motion_ok(clips, labels):
    """Estimated direction within 22.5 degrees of the class direction (stripes excluded)."""
    want = 2 * math.pi * labels.float() / data.NUM_CLASSES
    diff = torch.remainder(motion_angle(clips) - want + math.pi, 2 * math.pi) - math.pi
    return diff.abs() < math.pi / 8


def _conditioning(kind, table, row, guidance):
    extra = {}
    if kind == "flux":
        extra = {"pooled_output": table["pooled"][row:row + 1], "guidance": guidance}
    return [[table["labels"][row:row + 1], extra]]


def generate(kind, patcher, table, label, n, frames, args):
    """n samples of one label through comfy.sample.sample; returns pixels in [0, 1]."""
    import comfy.sample
    if kind == "wan":
        latent = torch.zeros(n, 16, frames, 16, 16)
    else:
        latent = torch.zeros(n, 16, 16, 16)
    seed = args.seed + 1000 * label + frames
    noise = comfy.sample.prepare_noise(latent, seed)
    positive = _conditioning(kind, table, label, args.guidance)
    negative = _conditioning(kind, table, data.NUM_CLASSES, args.guidance)
    out = comfy.sample.sample(patcher, noise, args.steps, args.cfg, args.sampler, args.scheduler, positive,
                              negative, latent, disable_pbar=True, seed=seed)
    pixels = latent_to_image(out)
    return pixels[:, :, 0] if kind == "wan" and frames == 1 else pixels


def _save_grid(pixels, path):
    """Rows = labels, columns = samples ([C, n, 3, H, W]) or frames of one sample per label."""
    rows = [torch.cat(list(row), dim=2) for row in pixels]
    grid = torch.cat(rows, dim=1)
    img = Image.fromarray((grid.permute(1, 2, 0) * 255).round().byte().numpy())
    path.parent.mkdir(parents=True, exist_ok=True)
    img.resize((img.width * 3, img.height * 3), Image.NEAREST).save(path)


def _report(title, predicted, labels, chance):
    print(f"  {title}")
    per = []
    for c in range(data.NUM_CLASSES):
        hit = (predicted[labels == c] == c).float().mean().item()
        per.append(hit)
        print(f"    {c} {data.CLASS_NAMES[c]:<24} {hit:6.1%}")
    overall = (predicted == labels).float().mean().item()
    print(f"    overall {overall:.1%}  (chance {chance:.1%})")
    return overall


def check(kind, checkpoint, args):
    """Sample, classify, write the grids; returns {measurement: accuracy}."""
    patcher = train.load_wan(checkpoint) if kind == "wan" else train.load_flux(checkpoint)
    table = train.load_labels(checkpoint)
    name = Path(checkpoint).stem
    n = args.per_label
    chance = 1.0 / data.NUM_CLASSES
    labels = torch.arange(data.NUM_CLASSES).repeat_interleave(n)
    results = {}
    modes = [("images", 1)] + ([("clips", data.FRAMES)] if kind == "wan" else [])
    print(f"{name}: {n} samples per label, {args.steps} {args.sampler}/{args.scheduler} steps, cfg {args.cfg}"
          + (f", guidance {args.guidance}" if kind == "flux" else ""))
    for mode, frames in modes:
        clips = frames > 1
        centroids = class_centroids(clips, seed=10_000)
        real, real_labels = (data.make_clips if clips else data.make_images)(len(labels), 20_000, labels=labels)
        ceiling = (classify(real, centroids) == real_labels).float().mean().item()
        start = time.time()
        samples = torch.cat([generate(kind, patcher, table, c, n, frames, args) for c in range(data.NUM_CLASSES)])
        elapsed = time.time() - start
        print(f"  [{mode}] sampled {len(samples)} in {elapsed:.1f}s; classifier on real data {ceiling:.1%}")
        results[mode] = _report(f"{mode}: nearest-centroid class", classify(samples, centroids), labels, chance)
        grid = samples.reshape(data.NUM_CLASSES, n, *samples.shape[1:])
        if clips:
            moving = labels != data.CLASS_NAMES.index("cyan_stripes")
            real_motion = motion_ok(real[moving], labels[moving]).float().mean().item()
            results["motion"] = motion_ok(samples[moving], labels[moving]).float().mean().item()
            print(f"  motion direction within 22.5 deg (stripes excluded): {results['motion']:.1%} "
                  f"(real data {real_motion:.1%}, chance 12.5%)")
            _save_grid(grid[:, 0].permute(0, 2, 1, 3, 4), OUT / f"{name}_clips.png")
        else:
            _save_grid(grid, OUT / f"{name}_samples.png")
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="*", help="wan and/or flux (default: both)")
    parser.add_argument("--quick", action="store_true", help="2 samples per label, 10 steps")
    parser.add_argument("--per-label", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=3.0)
    parser.add_argument("--guidance", type=float, default=3.5, help="Flux guidance embedding")
    parser.add_argument("--sampler", default="euler")
    parser.add_argument("--scheduler", default="simple")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dir", default=str(train.MODELS), help="folder holding tiny_<model>.safetensors")
    parser.add_argument("--min-accuracy", type=float, default=0.8, help="exit 1 below this (images)")
    args = parser.parse_args(argv)
    if set(args.models) - {"wan", "flux"}:
        parser.error(f"unknown model in {args.models}")
    if args.quick:
        args.per_label, args.steps = 2, 10
    torch.set_num_threads(args.threads)
    train.import_host()
    failed = False
    for kind in args.models or ["wan", "flux"]:
        results = check(kind, Path(args.dir) / f"tiny_{kind}.safetensors", args)
        failed |= results["images"] < args.min_accuracy
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

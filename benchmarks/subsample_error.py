"""The error of the strided indicator subsample (cache_core.policies.SUBSAMPLE_ROWS) at real token counts.

The policies' indicators (relative L1 changes, mean magnitudes) read every k-th token row of a feature with
k = rows // SUBSAMPLE_ROWS. This measures |subsampled - full| / full of the relative L1 change between two
steps' features at Wan 2.1 token counts, on synthetic features with the structure hidden states have:
smooth over the token grid (low-frequency fields), per-channel scales, and token noise; the step change
likewise. `python -m benchmarks.subsample_error` prints one row per case and the worst relative error.
"""
from __future__ import annotations

import argparse
import math

import torch

from cache_core.policies import SUBSAMPLE_ROWS, relative_l1, subsample

# (name, frames, height, width) of the latent token grid after patching: Wan 2.1 480p and 720p, 81 frames
GRIDS = (("wan 480p 81f", 21, 30, 52), ("wan 720p 81f", 21, 45, 80))
CHANGES = (0.01, 0.05, 0.2)


def smooth_field(grid: tuple, channels: int, g: torch.Generator, waves: int = 6) -> torch.Tensor:
    """[tokens, channels]: a sum of random low-frequency plane waves over (frame, y, x)."""
    f, h, w = grid
    coords = torch.stack(torch.meshgrid(torch.arange(f) / f, torch.arange(h) / h, torch.arange(w) / w,
                                        indexing="ij"), -1).reshape(-1, 3)
    out = torch.zeros(coords.shape[0], channels)
    for _ in range(waves):
        direction = torch.randn(3, generator=g) * 2 * math.pi * torch.randint(1, 4, (1,), generator=g)
        phase = torch.rand(channels, generator=g) * 2 * math.pi
        out += torch.sin(coords @ direction.unsqueeze(1) + phase) * torch.rand(channels, generator=g)
    return out


def feature(grid: tuple, channels: int, g: torch.Generator) -> torch.Tensor:
    scale = torch.rand(1, channels, generator=g) * 2 + 0.1
    tokens = math.prod(grid)
    return (smooth_field(grid, channels, g) + 0.3 * torch.randn(tokens, channels, generator=g)) * scale


def measure(channels: int, seeds: int) -> list:
    rows = []
    for name, *grid in GRIDS:
        for change in CHANGES:
            errors = []
            for seed in range(seeds):
                g = torch.Generator().manual_seed(seed)
                previous = feature(tuple(grid), channels, g).unsqueeze(0)
                current = previous + change * feature(tuple(grid), channels, g).unsqueeze(0)
                full = float((current - previous).abs().mean() / previous.abs().mean())
                errors.append(abs(float(relative_l1(current, previous)) - full) / full)
            rows.append(dict(grid=name, tokens=math.prod(grid), rows_read=subsample(previous).shape[0],
                             change=change, max_relative_error=max(errors), mean_relative_error=sum(errors) / seeds))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=256, help="feature width (default 256; error barely "
                        "depends on it, memory does)")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args(argv)
    rows = measure(args.channels, args.seeds)
    print(f"SUBSAMPLE_ROWS = {SUBSAMPLE_ROWS}, {args.channels} channels, {args.seeds} seeds")
    print("| grid | tokens | rows read | step change | max rel. error | mean rel. error |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['grid']} | {r['tokens']} | {r['rows_read']} | {r['change']:g} | "
              f"{100 * r['max_relative_error']:.2f}% | {100 * r['mean_relative_error']:.2f}% |")
    print(f"worst: {100 * max(r['max_relative_error'] for r in rows):.2f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

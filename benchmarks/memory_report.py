"""Cache memory at real model sizes (Flux-dev, Wan 2.1 14B 720p), from the engine's own accounting.

Every (model, site, forecaster, cache dtype) runs a CacheRun through enough computed evaluations to
fill its histories, storing meta tensors of the real shapes: the bytes are what the engine counts
(`peak_cache_bytes`), nothing is allocated. The baseline is a per-module order-2 Taylor cache (what
the ComfyUI TaylorSeer pack keeps: every attention and MLP output of every block, three terms each,
in the model's dtype): the engine counts one cached value per module, times 3. At Flux-dev size it gives
2.0 / 4.0 / 6.0 GiB for orders 0 / 1 / 2, the +2 / 4 / 6 GB reported for that pack.

    python -m benchmarks.memory_report [--out out] [--quick]   # writes out/memory_report.md and .json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass

import torch

from cache_core import CacheConfig, CacheRun, ForecasterConfig, Site, TokenGrid

SIGMAS = [1.0, 0.9, 0.78, 0.65, 0.5, 0.35, 0.0]  # 6 computed evaluations fill every history
FORECASTERS = (ForecasterConfig("reuse"), ForecasterConfig("taylor", 1), ForecasterConfig("taylor", 2),
               ForecasterConfig("taylor", 3), ForecasterConfig("hicache"), ForecasterConfig("ab", 2),
               ForecasterConfig("ab", 3), ForecasterConfig("foca"), ForecasterConfig("spectrum"),
               ForecasterConfig("freqca"), ForecasterConfig("hyca"), ForecasterConfig("auto"))
# HyCa's peak is its warmup, while every candidate keeps a history; its selection (after 3 held-out points)
# drops the others. 3 computed evaluations fill every candidate's history and stop before the selection.
# auto keeps every candidate for the whole run (6 evaluations fill them all).
EVALUATIONS = {"hyca": 3}
CACHE_DTYPES = ("auto", "fp32")
SITES = (Site("model"), Site("span", probe_blocks=1), Site("blocks", probe_blocks=1))  # the node's defaults
QUICK_FORECASTERS = (ForecasterConfig("reuse"), ForecasterConfig("taylor", 2))
QUICK_SITES = (Site("span", probe_blocks=1),)
BASELINE_ORDER = 2
TARGET_RATIO = 0.05  # order-2 forecasting at Flux-dev size: <= 5% of the per-module order-2 cache


@dataclass(frozen=True)
class ModelSize:
    name: str
    layout: tuple  # ((block kind, count), ...) in execution order
    streams: tuple  # ((block kind, ((stream, tokens), ...)), ...): the hidden states a block site caches
    modules: tuple  # ((block kind, ((module, tokens), ...)), ...): the outputs a per-module cache keeps
    width: int
    latent: tuple  # the model call's latent [C, *spatial] (the whole-model site caches eps of this shape)
    grid: tuple  # image-token grid
    dtype: torch.dtype
    conditionings: int  # 1: guidance-distilled (Flux-dev); 2: cond + uncond (CFG)

    @property
    def image_tokens(self) -> int:
        return math.prod(self.grid)


FLUX_DEV = ModelSize(
    "Flux-dev 1024x1024", layout=(("double_block", 19), ("single_block", 38)),
    streams=(("double_block", (("img", 4096), ("txt", 512))), ("single_block", (("img", 4608),))),
    # a single block fuses its parallel attention and MLP into one output: the per-module pack caches that one
    modules=(("double_block", (("img_attn", 4096), ("img_mlp", 4096), ("txt_attn", 512), ("txt_mlp", 512))),
             ("single_block", (("attn_mlp", 4608),))),
    width=3072, latent=(16, 128, 128), grid=(64, 64), dtype=torch.bfloat16, conditionings=1)
WAN_14B = ModelSize(
    "Wan 2.1 14B 81x720x1280", layout=(("double_block", 40),),
    streams=(("double_block", (("img", 75600),)),),  # latent 21 x 90 x 160, patch (1, 2, 2)
    modules=(("double_block", (("self_attn", 75600), ("cross_attn", 75600), ("ffn", 75600))),),
    width=5120, latent=(16, 21, 90, 160), grid=(21, 45, 80), dtype=torch.bfloat16, conditionings=2)
MODELS = (FLUX_DEV, WAN_14B)


def site_values(size: ModelSize, site: Site) -> dict:
    """key -> (per-conditioning shape, dtype, grid) of every value the engine caches at `site`."""
    if not site.uses_blocks:  # eps = (x - denoised) / sigma, in the sampler's float32
        return {"model": ((1, *size.latent), torch.float32, TokenGrid(size.latent[1:], channels_first=True))}
    streams = {kind: dict(entries) for kind, entries in size.streams}
    values = {}
    for segment in site.plan(list(size.layout)).segments:
        for stream, tokens in streams[segment.kind].items():
            grid = TokenGrid(size.grid) if tokens >= size.image_tokens else None
            values[(segment.key, stream)] = ((1, tokens, size.width), size.dtype, grid)
    return values


def module_values(size: ModelSize) -> dict:
    """key -> (shape, dtype, grid) of every module output a per-module cache keeps."""
    return {(kind, i, module): ((1, tokens, size.width), size.dtype, None)
            for kind, count in size.layout for i in range(count) for module, tokens in dict(size.modules)[kind]}


def engine_bytes(config: CacheConfig, values: dict, conditionings: int, evaluations: int = len(SIGMAS) - 1,
                 device: str = "meta") -> int:
    """Peak cache bytes the engine counts after `evaluations` computed evaluations storing `values`."""
    run = CacheRun(config, ["model"], SIGMAS)
    uuids = [f"c{i}" for i in range(conditionings)]
    batched = {key: torch.zeros((conditionings, *shape[1:]), dtype=dtype, device=device)
               for key, (shape, dtype, _) in values.items()}
    sample = next(iter(batched.values()))
    for sigma in SIGMAS[:evaluations]:
        run.begin_call(uuids, sigma, sample)
        for key, value in batched.items():
            run.store(key, value, values[key][2])
    return run.report()["peak_cache_bytes"]


def baseline_bytes(size: ModelSize, device: str = "meta") -> int:
    """The per-module order-2 Taylor cache: order+1 terms per module output, each in the model's dtype (the
    engine keeps differences in float32, so it counts one term per module, times order+1)."""
    return (BASELINE_ORDER + 1) * engine_bytes(CacheConfig(), module_values(size), size.conditionings, device=device)


def measure(sizes=MODELS, forecasters=FORECASTERS, sites=SITES, cache_dtypes=CACHE_DTYPES, device="meta") -> list:
    rows = []
    for size in sizes:
        baseline = baseline_bytes(size, device)
        for site in sites:
            values = site_values(size, site)
            for forecaster in forecasters:
                row = {"model": size.name, "site": site.kind, "forecaster": forecaster.label,
                       "cached_values": len(values) * size.conditionings, "baseline_bytes": baseline}
                for cache_dtype in cache_dtypes:
                    config = CacheConfig(forecaster=forecaster, site=site, cache_dtype=cache_dtype)
                    evaluations = EVALUATIONS.get(forecaster.kind, len(SIGMAS) - 1)
                    row[f"bytes_{cache_dtype}"] = engine_bytes(config, values, size.conditionings, evaluations, device)
                row["ratio_to_baseline"] = row[f"bytes_{cache_dtypes[0]}"] / baseline
                rows.append(row)
    return rows


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def markdown(rows: list, cache_dtypes=CACHE_DTYPES) -> str:
    lines = ["# Cache memory at real model sizes", "",
             "Peak cache bytes counted by the engine (meta tensors of the real shapes). Baseline: a per-module "
             f"order-{BASELINE_ORDER} Taylor cache (every attention and MLP output of every block, model dtype). "
             "Flux-dev: 1 conditioning (guidance-distilled); Wan: cond + uncond. Block sites with 1 probe block.", ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        subset = [r for r in rows if r["model"] == model]
        lines += [f"## {model}: per-module order-{BASELINE_ORDER} baseline {_gib(subset[0]['baseline_bytes'])} GiB", "",
                  "| site | forecaster | cached values | " + " | ".join(f"GiB ({d})" for d in cache_dtypes)
                  + f" | share of baseline ({cache_dtypes[0]}) |",
                  "|---|---|---:|" + "---:|" * len(cache_dtypes) + "---:|"]
        for r in subset:
            sizes = " | ".join(_gib(r[f"bytes_{d}"]) for d in cache_dtypes)
            lines.append(f"| {r['site']} | {r['forecaster']} | {r['cached_values']} | {sizes} | "
                         f"{100 * r['ratio_to_baseline']:.1f}% |")
        lines.append("")
    return "\n".join(lines)


def target(rows: list) -> dict:
    """Order-2 Taylor at Flux-dev size, span site, against the per-module order-2 cache."""
    row = next(r for r in rows if r["model"] == FLUX_DEV.name and r["site"] == "span" and r["forecaster"] == "taylor2")
    return {"ratio": row["ratio_to_baseline"], "target": TARGET_RATIO, "met": row["ratio_to_baseline"] <= TARGET_RATIO}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="out", help="folder for memory_report.md and memory_report.json")
    parser.add_argument("--quick", action="store_true", help="only the span site with reuse and taylor2")
    args = parser.parse_args(argv)
    rows = measure(forecasters=QUICK_FORECASTERS, sites=QUICK_SITES) if args.quick else measure()
    goal = target(rows)
    verdict = "met" if goal["met"] else "missed"
    text = markdown(rows) + (f"\nOrder-2 Taylor, span site, Flux-dev: {100 * goal['ratio']:.1f}% of the per-module "
                             f"order-2 cache (target <= {100 * TARGET_RATIO:.0f}%: {verdict}).\n")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "memory_report.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "memory_report.json"), "w") as f:
        json.dump({"rows": rows, "target": goal}, f, indent=1)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

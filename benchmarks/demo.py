"""`make demo`: run workflows/api/demo.json headless in the real host, cached and uncached, and report.

Writes out/demo/{cached.png, uncached.png, cache_map.png, report.json} and prints a short table.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import numpy as np
import torch
from PIL import Image

from benchmarks import graphs, host as host_module
from benchmarks.latent import frames
from benchmarks.metrics import psnr, ssim

REPO_ROOT = host_module.REPO_ROOT
MODELS_DIR = os.path.join(REPO_ROOT, "benchmarks", "models")


def save_png(images: torch.Tensor, path: str, scale: int = 4) -> None:
    """Frames side by side, upscaled so tiny outputs are visible."""
    row = torch.cat(list(images), dim=-1)
    array = (row.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(array).resize((array.shape[1] * scale, array.shape[0] * scale), Image.NEAREST).save(path)


def use_bundled_or_generated_model(host, graph: dict, out_dir: str) -> dict:
    """Register the bundled trained tiny Wan; without it, swap in a generated (random-weight) checkpoint."""
    if os.path.isfile(os.path.join(MODELS_DIR, "tiny_wan.safetensors")):
        host.add_model_dir(MODELS_DIR)
        return graph
    from benchmarks import fixtures
    print("note: the trained tiny Wan is missing; using a generated random-weight checkpoint")
    generated = fixtures.ensure_fixtures(os.path.join(out_dir, "models"))
    for node in graph.values():
        if node["class_type"] == "UNETLoader":
            node["inputs"]["unet_name"] = generated["wan_name"]
        if node["class_type"] == "FCFixtureLabelConditioning":
            node["inputs"]["path"] = generated["wan_labels"]
            node["inputs"]["label"] = min(node["inputs"]["label"], fixtures.N_LABELS - 1)
    return graph


def run(host, graph: dict):
    start = time.perf_counter()
    outputs = host.execute(graph)
    seconds = time.perf_counter() - start
    report = next((ui["feature_cache_report"][0] for ui in outputs.values() if "feature_cache_report" in ui), None)
    key = next(node["inputs"]["key"] for node in graph.values() if node["class_type"] == "FCFixtureCapture")
    return host.captured(key), report, seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workflow", default=os.path.join(REPO_ROOT, "workflows", "api", "demo.json"))
    parser.add_argument("--out", default=os.path.join(REPO_ROOT, "out", "demo"))
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    host = host_module.boot(output_dir=os.path.join(args.out, "comfy"))
    with open(args.workflow) as f:
        cached_graph = graphs.resolve_paths(json.load(f), REPO_ROOT)
    cached_graph = use_bundled_or_generated_model(host, cached_graph, args.out)
    plain_graph = graphs.without_cache(cached_graph)

    plain, _, plain_s = run(host, plain_graph)
    cached, report, cached_s = run(host, cached_graph)
    a, b = frames(cached), frames(plain)
    fidelity = {"psnr": psnr(a, b), "ssim": ssim(a, b), "latent_psnr": psnr(cached, plain, float(plain.abs().max()))}
    save_png(a, os.path.join(args.out, "cached.png"))
    save_png(b, os.path.join(args.out, "uncached.png"))
    map_folder = os.path.join(host.output_dir, "output", "feature_cache")  # where the Cache Map node saved it
    newest_map = max((f for f in os.listdir(map_folder) if f.endswith(".png")),
                     key=lambda f: os.path.getmtime(os.path.join(map_folder, f)))
    shutil.copyfile(os.path.join(map_folder, newest_map), os.path.join(args.out, "cache_map.png"))
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump({**report, **fidelity, "seconds_cached": cached_s, "seconds_uncached": plain_s}, f, indent=1)

    setting = (f"threshold {report['threshold']:.3g}" if report["budget"] is None
               else f"budget {report['budget']:.3f}")
    rows = [
        ("method", f"{report['method']} ({setting}), forecaster {report['forecaster']}, site {report['site']}"),
        ("evaluations computed / filled", f"{report['evaluations_computed']} / {report['evaluations_filled']}"),
        ("block compute fraction", f"{report['compute_fraction']:.3f}"),
        ("ideal speedup", f"{report['ideal_speedup']:.2f}x"),
        ("wall clock (uncached / cached)", f"{plain_s:.2f} s / {cached_s:.2f} s"),
        ("PSNR / SSIM vs uncached (same seed)", f"{fidelity['psnr']:.2f} dB / {fidelity['ssim']:.4f}"),
        ("peak cache memory", f"{report['peak_cache_bytes'] / 1024:.1f} KiB"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\nFeatureCache demo: " + os.path.relpath(args.workflow, REPO_ROOT))
    for k, v in rows:
        print(f"  {k.ljust(width)}  {v}")
    print(f"outputs in {os.path.relpath(args.out, REPO_ROOT)}/: cached.png uncached.png cache_map.png report.json")
    print(f"host log (its expected import warnings included): {os.path.relpath(host.output_dir, REPO_ROOT)}/host.log")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The frontier benchmark's cases: a model, a sampler setting and the samples (label, seed) to run.

A case is a list of API-format graphs, one per sample, that already hold our cache nodes: every
method is then a rewrite of the same graphs and the uncached reference is graphs.without_cache, so
all methods are compared on exactly the same sampler runs.
"""
from __future__ import annotations

import atexit
import copy
import dataclasses
import json
import os
import shutil
import tempfile

from safetensors import safe_open

from benchmarks import fixtures, graphs, ui_workflow
from benchmarks.host import REPO_ROOT

MODELS_DIR = os.path.join(REPO_ROOT, "benchmarks", "models")
TRAINED = {"wan": ("tiny_wan.safetensors", "tiny_wan_labels.safetensors"),
           "flux": ("tiny_flux.safetensors", "tiny_flux_labels.safetensors")}
CFG = 3.0  # what the trained models are checked with (benchmarks/check_learned.py)
IMAGE_SIZE = 128  # 32x32 pixels: the trained models' data, 16x16 latents
QUICK_SIZE = 64
# Wan 2.1 1.3B widths; text width 4096 is fixed by the host's Wan detection.
SLICE_DIMS = dict(dim=1536, ffn_dim=8960, num_layers=3)
QUICK_SLICE_DIMS = dict(dim=256, ffn_dim=1024, num_layers=3)


@dataclasses.dataclass
class Case:
    id: str  # what --cases selects
    model: str
    name: str
    graphs: list  # one cached graph per sample
    samples: list  # a label per graph, e.g. "label 0 seed 1"
    threads: int | None = 1  # torch threads while it runs; tiny models lose to threading overhead
    fixed_only: bool = False  # random weights: a speed-only case (its records go to the speed table)
    repeats: int = 1  # interleaved uncached/cached pairs timed per setting (tiny models: wall clock is indicative)


@dataclasses.dataclass
class Models:
    """The graphs.py paths dict for the tiny models, and where each model came from (for the report)."""
    paths: dict
    origin: dict


def label_count(path: str) -> int:
    with safe_open(path, "pt") as f:
        return f.get_slice("labels").get_shape()[0]


def tiny_models(host, work_dir: str) -> Models:
    """The trained tiny models from benchmarks/models; each missing one falls back to a generated
    random-weight fixture, which the report states (random weights say little about caching)."""
    generated = None
    paths, origin = {}, {}
    for kind, (model_file, labels_file) in TRAINED.items():
        model_path = os.path.join(MODELS_DIR, model_file)
        if os.path.isfile(model_path) and os.path.isfile(os.path.join(MODELS_DIR, labels_file)):
            if kind == "wan":
                host.add_model_dir(MODELS_DIR)
                paths["wan_name"] = model_file
            else:
                paths["flux"] = model_path
            paths[f"{kind}_labels"] = os.path.join(MODELS_DIR, labels_file)
            origin[kind] = f"trained: benchmarks/models/{model_file}"
        else:
            generated = generated or fixtures.ensure_fixtures(os.path.join(work_dir, "models"))
            for key in (("wan_name", "wan_labels") if kind == "wan" else ("flux", "flux_labels")):
                paths[key] = generated[key]
            origin[kind] = f"GENERATED RANDOM WEIGHTS (benchmarks/models/{model_file} missing)"
    return Models(paths, origin)


def external_wan(host, model_file: str, cond_file: str) -> Models:
    """A Wan checkpoint from anywhere, with its per-label embeddings ('labels' [N, L, 4096])."""
    for path in (model_file, cond_file):
        if not os.path.isfile(path):
            raise FileNotFoundError(path)
    host.add_model_dir(os.path.dirname(os.path.abspath(model_file)))
    paths = dict(wan_name=os.path.basename(model_file), wan_labels=os.path.abspath(cond_file))
    return Models(paths, {"wan": f"--model-file {model_file} --cond-file {cond_file}"})


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Command-line overrides of every case's sampler settings and samples (None: the case's own)."""

    sampler_name: str | None = None
    scheduler: str | None = None
    steps: int | None = None
    cfg: float | None = None
    labels: tuple | None = None  # label rows of the embeddings file (the last row stays the negative)
    seeds: tuple | None = None

    def sampler(self, **case_sampler) -> dict:
        overrides = dict(sampler_name=self.sampler_name, scheduler=self.scheduler, steps=self.steps, cfg=self.cfg)
        return {**case_sampler, **{k: v for k, v in overrides.items() if v is not None}}

    def apply_to_workflow(self, graph: dict) -> list[dict]:
        """The workflow once per seed, with the sampler overrides on every node that has those inputs."""
        if self.labels is not None:
            raise ValueError("--labels chooses rows of the tiny models' label files; a workflow has its own prompts")
        graph = copy.deepcopy(graph)
        overrides = self.sampler()
        for node in graph.values():
            node["inputs"].update({k: v for k, v in overrides.items() if k in node["inputs"]})
        out = []
        for seed in self.seeds or [None]:
            seeded = copy.deepcopy(graph)
            for node in seeded.values():
                for key in ("seed", "noise_seed"):
                    if seed is not None and key in node["inputs"] and not isinstance(node["inputs"][key], list):
                        node["inputs"][key] = seed
            out.append(seeded)
        return out


def _labels(path: str, count: int, chosen=None) -> tuple[list[int], int]:
    """`count` positive labels spread over the file (or the `chosen` ones) and the negative one: the
    last row (the null label of the trained models' files)."""
    n = label_count(path)
    if n < 2:
        raise ValueError(f"{path}: need at least 2 label embeddings (the last one is the negative), found {n}")
    if chosen is not None:
        wrong = [label for label in chosen if not 0 <= label < n - 1]
        if wrong:
            raise ValueError(f"--labels {wrong}: {path} has labels 0..{n - 2} (row {n - 1} is the negative)")
        return list(chosen), n - 1
    count = min(count, n - 1)
    return [i * (n - 1) // count for i in range(count)], n - 1


def _sampler_name(sampler: dict) -> str:
    text = f"{sampler['sampler_name']}/{sampler['scheduler']} {sampler['steps']}"
    return text if sampler["cfg"] == CFG else f"{text}, cfg {sampler['cfg']:g}"


def _case(case_id, model, kind, sampler, build, labels_path, n_labels, seeds, schedule=None, **extra) -> Case:
    schedule = schedule or Schedule()
    sampler = schedule.sampler(**sampler)
    positives, negative = _labels(labels_path, n_labels, schedule.labels)
    cached, samples = [], []
    for label in positives:
        for seed in schedule.seeds or seeds:
            cached.append(graphs.with_cache(build(label=label, negative_label=negative, seed=seed, **sampler)))
            samples.append(f"label {label} seed {seed}")
    return Case(case_id, model, f"{kind}, {_sampler_name(sampler)}", cached, samples, **extra)


def tiny_cases(models: Models, quick: bool, wan_name: str = "tiny-wan", schedule: Schedule | None = None) -> list[Case]:
    """Image and video on Wan, image on Flux; Euler 30 steps and two non-uniform schedules."""
    paths = models.paths
    size = QUICK_SIZE if quick else IMAGE_SIZE
    euler = dict(sampler_name="euler", scheduler="simple", steps=6 if quick else 30, cfg=CFG)
    dpm = dict(sampler_name="dpmpp_2m", scheduler="karras", steps=5 if quick else 20, cfg=CFG)
    unipc = dict(sampler_name="uni_pc", scheduler="beta", steps=6 if quick else 50, cfg=4.0)
    n_labels, seeds = (1, [1]) if quick else (2, [1])  # two labels: every method of `make bench` in 20 minutes
    video_frames = 2 if quick else 4

    def wan(frames):
        return lambda **k: graphs.wan_graph(paths, size=size, frames=frames, **k)

    def flux(**k):
        return graphs.flux_graph(paths, size=size, **k)

    out = []
    if "wan_name" in paths:
        labels = paths["wan_labels"]
        out += [
            _case("wan-image", wan_name, "image", euler, wan(1), labels, n_labels, seeds, schedule),
            _case("wan-image-dpm", wan_name, "image", dpm, wan(1), labels, n_labels, seeds, schedule),
            _case("wan-image-unipc", wan_name, "image", unipc, wan(1), labels, n_labels, seeds, schedule),
            _case("wan-video", wan_name, f"video {video_frames} latent frames", euler, wan(video_frames), labels,
                  n_labels, seeds[:1], schedule),
        ]
    if "flux" in paths:
        out.append(_case("flux-image", "tiny-flux", "image", euler, flux, paths["flux_labels"], n_labels, seeds,
                         schedule))
    return out


def slice_case(host, quick: bool, size: int | None = None) -> Case:
    """Wan 2.1 1.3B widths with 3 blocks and random weights, so compute dominates as on a GPU: the
    speed (efficiency) case. Written once per process to a temporary folder, loaded by UNETLoader.
    `size`: image pixels (default the tiny cases'), e.g. larger for token methods' realistic token counts."""
    dims = QUICK_SLICE_DIMS if quick else SLICE_DIMS
    folder = tempfile.mkdtemp(prefix="fc-slice-")
    atexit.register(shutil.rmtree, folder, True)
    name = "fc_slice_wan_{dim}x{num_layers}.safetensors".format(**dims)
    fixtures.write_tiny_wan(os.path.join(folder, name), **dims)
    labels = fixtures.write_label_embeddings(os.path.join(folder, "labels.safetensors"), 2, fixtures.LABEL_LENGTH,
                                             fixtures.WAN_TEXT_DIM)
    host.add_model_dir(folder)
    paths = dict(wan_name=name, wan_labels=labels)
    sampler = dict(sampler_name="euler", scheduler="simple", steps=4 if quick else 8, cfg=CFG)
    size = size or (QUICK_SIZE if quick else IMAGE_SIZE)
    build = lambda **k: graphs.wan_graph(paths, size=size, **k)
    model = "wan-slice dim {dim} ffn {ffn_dim} x{num_layers} blocks (random)".format(**dims)
    if size != (QUICK_SIZE if quick else IMAGE_SIZE):
        model += f", {size}px ({(size // 16) ** 2} image tokens)"
    # one thread: on a CPU shared with other work a wider pool stalls at every op (measured: uncached slice run
    # 4.3 s with 1 thread, 16.0 s with 2 on 2 busy cores); `--threads 2` on a quiet machine
    return _case("slice", model, "image", sampler, build, labels, 1, [1], threads=1, fixed_only=True, repeats=2)


def workflow_case(host, path: str, schedule: Schedule | None = None) -> Case:
    """Any workflow holding one ApplyFeatureCache, API format or the UI format the frontend saves
    (converted as the frontend queues it), run as it is (its own prompt; seed and sampler as given
    unless overridden). The bundled models' folder is registered, so the workflows in workflows/
    that load the tiny models run as they are."""
    with open(path) as f:
        workflow = json.load(f)
    if "nodes" in workflow and "links" in workflow:
        workflow = ui_workflow.to_api(workflow, ui_workflow.object_info(host.node_classes))
    workflow = graphs.resolve_paths(workflow, REPO_ROOT)
    applies = [nid for nid, node in workflow.items() if node.get("class_type") == "ApplyFeatureCache"]
    if len(applies) != 1:
        raise ValueError(f"{path}: a workflow to benchmark needs exactly one ApplyFeatureCache node, "
                         f"found {len(applies)}")
    host.add_model_dir(MODELS_DIR)
    schedule = schedule or Schedule()
    runs = schedule.apply_to_workflow(workflow)
    samples = [f"seed {seed}" for seed in schedule.seeds] if schedule.seeds else ["as given"]
    overrides = ", ".join(f"{k}={v}" for k, v in schedule.sampler().items())
    return Case("workflow", os.path.basename(path), f"workflow, {overrides}" if overrides else "workflow as given",
                runs, samples, threads=None, repeats=3)

"""Running a case's graphs in the host and measuring each method's settings against the uncached runs."""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import statistics
import time
import traceback

import numpy as np
import torch
from PIL import Image

from benchmarks import graphs
from benchmarks.frontier.flops import counting_flops
from benchmarks.frontier.methods import Method
from benchmarks.latent import frames
from benchmarks.metrics import psnr, ssim

PSNR_CAP = 100.0


class SamplerClock:
    """Time stamps of the host's progress hook: the sampler calls it after every step."""

    def __init__(self):
        self.stamps: list[tuple[str | None, float]] = []

    def __enter__(self):
        import comfy.utils
        self._utils = comfy.utils
        self._previous = (comfy.utils.PROGRESS_BAR_HOOK, comfy.utils.PROGRESS_BAR_ENABLED)
        comfy.utils.set_progress_bar_global_hook(self._hook)
        comfy.utils.set_progress_bar_enabled(False)  # no tqdm bars on stderr
        return self

    def __exit__(self, *exc):
        self._utils.set_progress_bar_global_hook(self._previous[0])
        self._utils.set_progress_bar_enabled(self._previous[1])

    def _hook(self, *args, **kwargs):
        from comfy_execution.utils import get_executing_context
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # kernels are asynchronous: stamp when the step has really finished
        context = get_executing_context()
        self.stamps.append((context.node_id if context else None, time.perf_counter()))
        if self._previous[0] is not None:
            self._previous[0](*args, **kwargs)

    def take(self) -> tuple[float, int, int]:
        """(seconds between each sampler node's first and last step, steps in them, sampler nodes); resets."""
        by_node: dict = {}
        for node, stamp in self.stamps:
            by_node.setdefault(node, []).append(stamp)
        self.stamps = []
        return (sum(s[-1] - s[0] for s in by_node.values()), sum(len(s) - 1 for s in by_node.values()), len(by_node))


@dataclasses.dataclass
class Run:
    images: torch.Tensor
    latent: torch.Tensor | None
    timing: tuple  # SamplerClock.take()
    report: dict | None
    flops: int | None  # diffusion-model FLOPs, when counted (flops.py)


def _saved_images(outputs: dict) -> torch.Tensor:
    """The IMAGE outputs a workflow saved or previewed, [N, 3, H, W] in [0, 1]."""
    import folder_paths
    images = []
    for node_id in sorted(outputs):
        for item in outputs[node_id].get("images", []):
            path = os.path.join(folder_paths.get_directory_by_type(item["type"]), item.get("subfolder", ""),
                                item["filename"])
            array = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
            images.append(torch.from_numpy(array).permute(2, 0, 1))
    if not images:
        raise ValueError("the graph saved no images (add a SaveImage or PreviewImage node) and has no latent capture")
    return torch.stack(images)


def run_graph(host, graph: dict, clock: SamplerClock, count_flops: bool = False) -> Run:
    """Runs a graph; a counted run is slower (a dispatch mode sees every op), so it is never timed."""
    with counting_flops() if count_flops else contextlib.nullcontext() as count:
        outputs = host.execute(graph)
    timing = clock.take()
    capture = next((n for n in graph.values() if n["class_type"] == "FCFixtureCapture"), None)
    latent = host.captured(capture["inputs"]["key"]) if capture else None
    images = frames(latent) if latent is not None else _saved_images(outputs)
    report = next((ui["feature_cache_report"][0] for ui in outputs.values() if "feature_cache_report" in ui), None)
    return Run(images, latent, timing, report, count.total if count_flops else None)


def _sampler_seconds(timings: list, uncached: list) -> float:
    """Median sampler time; the first step of each sampler (before the first stamp) at the uncached rate."""
    per_step = sum(t[0] for t in uncached) / max(1, sum(t[1] for t in uncached))
    return statistics.median(t[0] + t[2] * per_step for t in timings)


RAISED_AT = "\n\nraised at:\n"


def failure_text(error: BaseException) -> str:
    """The whole error (a host validation or node failure carries its cause, the node's traceback
    included, on the lines after the first) and where the benchmark saw it raised."""
    where = "".join(traceback.format_tb(error.__traceback__)[-3:]) if error.__traceback__ else ""
    return f"{type(error).__name__}: {str(error).strip()}" + (RAISED_AT + where.rstrip() if where else "")


def new_record(case, method: Method, setting: dict) -> dict:
    return dict(model=case.model, case=case.name, case_id=case.id, method=method.name, family=method.family,
                setting=setting, status="ok",
                error=None, samples=len(case.graphs), compute_fraction=None, report_fraction=None, flops=None,
                flops_uncached=None, ideal_speedup=None, wallclock_speedup=None, efficiency=None, psnr=None, ssim=None,
                latent_psnr=None, cache_bytes=None, sampler_seconds=None, sampler_seconds_uncached=None,
                overhead_ms_per_cached_step=None)


def _counted(host, case, method: Method, setting: dict, references: list, clock: SamplerClock) -> dict:
    """Per sample, a FLOP-counted cached run: fidelity against the reference and the compute fraction."""
    record = new_record(case, method, setting)
    fractions, report_fractions, flops, fidelity, cache_bytes = [], [], [], [], []
    for graph, ref in zip(case.graphs, references):
        run = run_graph(host, method.rewrite(graph, setting), clock, count_flops=True)
        fidelity.append((min(psnr(run.images, ref.images), PSNR_CAP), ssim(run.images, ref.images),
                         None if ref.latent is None else
                         min(psnr(run.latent, ref.latent, float(ref.latent.abs().max())), PSNR_CAP)))
        if run.flops == 0:
            raise ValueError("no diffusion-model FLOPs were counted in the cached run: cannot measure its compute")
        fractions.append(run.flops / ref.flops)
        flops.append(run.flops)
        if run.report is not None:
            report_fractions.append(run.report["compute_fraction"])
            cache_bytes.append(run.report["peak_cache_bytes"])
        elif method.ours:
            raise ValueError("the cached run produced no cache report")
    fraction = statistics.mean(fractions)
    record.update(compute_fraction=fraction, ideal_speedup=1.0 / fraction if fraction > 0 else math.inf,
                  report_fraction=statistics.mean(report_fractions) if report_fractions else None,
                  flops=statistics.mean(flops), flops_uncached=statistics.mean(r.flops for r in references),
                  psnr=statistics.mean(f[0] for f in fidelity), ssim=statistics.mean(f[1] for f in fidelity),
                  latent_psnr=None if fidelity[0][2] is None else statistics.mean(f[2] for f in fidelity),
                  cache_bytes=max(cache_bytes) if cache_bytes else None)
    return record


def _timed(record: dict, wallclock: float, cached_seconds: float, uncached_seconds: float, overheads: list) -> dict:
    """The timed part of a record (overheads from the timed runs: FLOP counting slows ops)."""
    record.update(wallclock_speedup=wallclock, efficiency=wallclock / record["ideal_speedup"],
                  sampler_seconds=cached_seconds, sampler_seconds_uncached=uncached_seconds,
                  overhead_ms_per_cached_step=statistics.median(overheads) if overheads else None)
    return record


def _overhead(run: Run) -> list:
    value = None if run.report is None else run.report.get("overhead_ms_per_cached_step")
    return [] if value is None else [value]


def measure(host, case, method: Method, setting: dict, references: list, clock: SamplerClock) -> dict:
    """One setting of a method on a case: per sample, a FLOP-counted run for fidelity and compute
    fraction; then `case.repeats` interleaved uncached / cached runs for the wall clock."""
    try:
        record = _counted(host, case, method, setting, references, clock)
        cached_t, uncached_t, overheads = [], [], []
        for k in range(case.repeats):
            graph = case.graphs[k % len(case.graphs)]
            uncached_t.append(run_graph(host, graphs.without_cache(graph), clock).timing)
            timed = run_graph(host, method.rewrite(graph, setting), clock)
            cached_t.append(timed.timing)
            overheads += _overhead(timed)
        u_seconds, c_seconds = _sampler_seconds(uncached_t, uncached_t), _sampler_seconds(cached_t, uncached_t)
        return _timed(record, u_seconds / c_seconds, c_seconds, u_seconds, overheads)
    except Exception as error:  # a failing method or node is a result, not the end of the benchmark
        return dict(new_record(case, method, setting), status="failed", error=failure_text(error))


# Speed-only cases: one uncached run before each round's first cached run and after every UNCACHED_EVERY of them.
UNCACHED_EVERY = 5


def _speed_round(host, case, graph: dict, entries: list, clock: SamplerClock) -> list:
    """One timed cached run per entry (record, method, setting), with the shared uncached runs around them.
    Returns (entry, cached seconds, uncached seconds around it, overheads): each cached run is set against the
    mean of the uncached runs just before and after it, so load that drifts on a shared machine cancels."""
    timeline = []  # ("uncached", timing) or (entry, timing, overheads)

    def uncached():
        timeline.append(("uncached", run_graph(host, graphs.without_cache(graph), clock).timing))

    uncached()
    for i, entry in enumerate(entries):
        try:
            timed = run_graph(host, entry[1].rewrite(graph, entry[2]), clock)
            timeline.append((entry, timed.timing, _overhead(timed)))
        except Exception as error:
            entry[0].update(status="failed", error=failure_text(error))
        if (i + 1) % UNCACHED_EVERY == 0 or i == len(entries) - 1:
            uncached()
    out = []
    for i, item in enumerate(timeline):
        if item[0] == "uncached":
            continue
        before = next(t for kind, t, *_ in reversed(timeline[:i]) if kind == "uncached")
        after = next(t for kind, t, *_ in timeline[i + 1:] if kind == "uncached")
        seconds = [_sampler_seconds([t], [before, after]) for t in (before, after)]
        out.append((item[0], _sampler_seconds([item[1]], [before, after]), statistics.mean(seconds), item[2]))
    return out


def run_speed_case(host, case, methods: list, clock, progress) -> list:
    """A speed-only case (the real-dims slice): per setting one FLOP-counted run (compute fraction), then
    `case.repeats` rounds that time every setting's cached run once, in an order rotated each round, sharing
    the uncached runs (_speed_round). Wall-clock speedup = median over rounds of uncached / cached seconds.
    Timing every family this way costs about a third of interleaving an uncached run with each cached one."""
    def counted(method, setting, references):
        try:
            return _counted(host, case, method, setting, references, clock)
        except Exception as error:
            return dict(new_record(case, method, setting), status="failed", error=failure_text(error))

    def body(references):
        records = _per_setting(case, methods, progress, lambda m, s: counted(m, s, references))
        entries = [(r, m, s) for r, (m, s) in zip(records, _settings(case, methods))]
        samples: dict = {id(r): [] for r in records}
        for k in range(case.repeats):
            ok = [e for e in entries if e[0]["status"] == "ok"]
            if not ok:
                break
            shift = k % len(ok)
            for entry, cached, uncached, overheads in _speed_round(host, case, case.graphs[k % len(case.graphs)],
                                                                   ok[shift:] + ok[:shift], clock):
                samples[id(entry[0])].append((uncached / cached, cached, uncached, overheads))
        for record in records:
            runs = samples[id(record)]
            if record["status"] == "ok" and runs:
                _timed(record, statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs),
                       statistics.median(r[2] for r in runs), [o for r in runs for o in r[3]])
            progress(record, None)
        return records
    return _referenced(host, case, methods, clock, body)


@contextlib.contextmanager
def torch_threads(n: int | None):
    previous = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _settings(case, methods: list) -> list:
    return [(m, s) for m in methods for s in m.settings_for(case.id)]


def _per_setting(case, methods: list, progress, measure_one) -> list:
    """measure_one(method, setting) for every setting of every method, each reported to `progress` with its time."""
    records = []
    for method, setting in _settings(case, methods):
        started = time.perf_counter()
        records.append(measure_one(method, setting))
        progress(records[-1], time.perf_counter() - started)
    return records


def _referenced(host, case, methods: list, clock, body) -> list:
    """body(references) after the case's uncached FLOP-counted runs, in the case's torch threads. If the
    references fail, every method is recorded as failed."""
    with torch_threads(case.threads):
        try:
            references = [run_graph(host, graphs.without_cache(g), clock, count_flops=True) for g in case.graphs]
        except Exception as error:
            text = "the uncached reference run failed: " + failure_text(error)
            return [dict(new_record(case, m, s), status="failed", error=text) for m, s in _settings(case, methods)]
        return body(references)


def run_case(host, case, methods: list, clock, progress) -> list:
    """All methods on one case, each setting counted then timed in interleaved uncached / cached pairs."""
    return _referenced(host, case, methods, clock, lambda references: _per_setting(
        case, methods, progress, lambda m, s: measure(host, case, m, s, references, clock)))

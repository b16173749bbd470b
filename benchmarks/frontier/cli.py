"""The command line: `python -m benchmarks.frontier` (`make bench`)."""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import json
import os
import subprocess
import sys
import threading
import time

import torch

from benchmarks import host as host_module
from benchmarks.frontier import cases as frontier_cases
from benchmarks.frontier.measure import SamplerClock, run_case, run_speed_case
from benchmarks.frontier.methods import (COMFY_NODES, DEFAULT_METHODS, QUICK_SLICE_METHODS, QUICK_SPEEDS,
                                         SLICE_METHODS, SLICE_SPEEDS, Param, build_methods, pack_methods, parse_sets,
                                         workflow_method_name)
from benchmarks.frontier.peers import peer_methods
from benchmarks.frontier.report import (error_summary, frontier_table, setting_text, speed_table, versus_table,
                                        write_markdown,
                                        write_plot)

REPO_ROOT = host_module.REPO_ROOT


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes, few steps, one sample, one setting per method")
    parser.add_argument("--out", default=os.path.join(REPO_ROOT, "out", "bench"))
    parser.add_argument("--cases", nargs="+",
                        help="default: all (wan-image wan-image-dpm wan-image-unipc wan-video flux-image slice)")
    parser.add_argument("--methods", nargs="+", help=f"default: {' '.join(DEFAULT_METHODS)}")
    parser.add_argument("--peers", metavar="DIR",
                        help="run the other caching packs of peers.py from their checkouts in DIR (make bench-peers)")
    parser.add_argument("--pack", help="another custom node pack (folder) to load")
    parser.add_argument("--node", action="append", default=[], help="a MODEL->MODEL node class of --pack (repeatable)")
    parser.add_argument("--param", action="append", default=[],
                        help="[Class.]key[@case]=value (fixed) or =v1,v2,... (swept): an input of every --node, or of "
                             "node Class only, on every case or on one case only (repeatable)")
    parser.add_argument("--set", action="append", default=[], dest="sets",
                        help="ROLE.input=v1,v2,... an input of our nodes (ROLE: policy, forecaster, tokens, apply), "
                             "swept as a product with speed, e.g. policy.max_consecutive=2,3 (repeatable)")
    parser.add_argument("--model-file", help="a Wan-architecture checkpoint (16-channel latents, 32x32-pixel images)")
    parser.add_argument("--cond-file", help="its label embeddings: 'labels' [N, L, 4096], the last row the negative")
    parser.add_argument("--workflow", help="an API-format workflow holding one ApplyFeatureCache; sweeps its settings")
    schedule = parser.add_argument_group("schedule: override every case's sampler settings and samples")
    schedule.add_argument("--sampler", help="sampler_name, e.g. uni_pc")
    schedule.add_argument("--scheduler", help="e.g. beta, karras")
    schedule.add_argument("--steps", type=int)
    schedule.add_argument("--cfg", type=float)
    schedule.add_argument("--labels", type=int, nargs="+", help="label rows of the label file (not with --workflow)")
    schedule.add_argument("--seeds", type=int, nargs="+", help="one sample per seed (and label)")
    parser.add_argument("--slice-size", type=int,
                        help="the slice's image size in pixels (default 128: 64 image tokens, where a CPU step is "
                             "weights-bound; 256: 256 tokens, 512: 1024 tokens, as token methods need)")
    parser.add_argument("--threads", type=int,
                        help="torch threads while each case runs (default: 1, torch's own with --workflow; more "
                             "only on a quiet machine: a pool wider than the free cores stalls at every op)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="fidelity cases run side by side in this many processes (default: 2, or 1 on one core); "
                             "the speed slice runs alone after them")
    parser.add_argument("--repeats", type=int,
                        help="interleaved uncached/cached runs timed per setting (default: 1 with --quick, else the "
                             "case's: 1 for the tiny fidelity cases, 2 for the slice, 3 with --workflow)")
    args = parser.parse_args(argv)
    if bool(args.model_file) != bool(args.cond_file):
        parser.error("--model-file and --cond-file go together")
    if bool(args.pack) != bool(args.node):
        parser.error("--pack and --node go together")
    if args.workflow and args.model_file:
        parser.error("--workflow and --model-file are alternatives")
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    return args


def schedule_of(args) -> frontier_cases.Schedule:
    as_tuple = lambda values: tuple(values) if values else None
    return frontier_cases.Schedule(args.sampler, args.scheduler, args.steps, args.cfg, as_tuple(args.labels),
                                   as_tuple(args.seeds))


def select_cases(host, args) -> tuple[list, dict]:
    """(the cases to run, where each model came from)."""
    schedule = schedule_of(args)
    if args.workflow:
        return [frontier_cases.workflow_case(host, args.workflow, schedule)], {"workflow": args.workflow}
    if args.model_file:
        models = frontier_cases.external_wan(host, args.model_file, args.cond_file)
        cases = frontier_cases.tiny_cases(models, args.quick, os.path.basename(args.model_file), schedule)
        ids = [c.id for c in cases]
    else:
        models = frontier_cases.tiny_models(host, args.out)
        cases = frontier_cases.tiny_cases(models, args.quick, schedule=schedule)
        ids = [c.id for c in cases] + ["slice"]
    wanted = args.cases or ids
    unknown = [c for c in wanted if c not in ids]
    if unknown:
        raise ValueError(f"unknown case(s) {', '.join(unknown)}; available: {', '.join(ids)}")
    cases = [c for c in cases if c.id in wanted]
    if "slice" in wanted:
        cases.append(frontier_cases.slice_case(host, args.quick, args.slice_size))
    return cases, models.origin


def worker_argv(argv: list, case_id: str, out: str) -> list:
    """This command's argv for one case run in its own process: its own --cases, --out and --jobs, and only the
    `--param` values scoped to no case or to it (this command checked every scope)."""
    groups = []  # each option with its values, e.g. ["--cases", "a", "b"] or ["--out=x"]
    for token in argv:
        if token.startswith("--") or not groups:
            groups.append([token])
        else:
            groups[-1].append(token)
    kept = []
    for group in groups:
        name, _, inline = group[0].partition("=")
        if name in ("--cases", "--out", "--jobs"):
            continue
        if name == "--param" and Param.parse(inline or group[1]).case not in (None, case_id):
            continue
        kept += group
    return [*kept, "--cases", case_id, "--out", out, "--jobs", "1"]


def run_in_workers(argv: list, case_ids: list, out: str, jobs: int) -> list:
    """Each case in its own process of this command, `jobs` at a time, its lines printed as they come
    (prefixed with the case); returns their records in case order. Outputs per case go to OUT/cases/ID/."""
    print_lock = threading.Lock()

    def run(case_id):
        folder = os.path.join(out, "cases", case_id)
        command = [sys.executable, "-m", "benchmarks.frontier", *worker_argv(argv, case_id, folder)]
        tail = collections.deque(maxlen=40)  # the last lines, for the error if it fails
        with subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              bufsize=1) as worker:
            for line in worker.stdout:
                tail.append(line)
                if line.strip() and not line.startswith(("|", "#", "WARNING")):  # progress, not its tables
                    with print_lock:
                        print(f"[{case_id}] {line.rstrip()}", flush=True)
        if worker.returncode != 0:
            raise RuntimeError(f"the {case_id} case's process failed (exit {worker.returncode}): "
                               f"{' '.join(command)}\n{''.join(tail)}")
        with open(os.path.join(folder, "frontier.json")) as f:
            return json.load(f)

    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        return [record for records in pool.map(run, case_ids) for record in records]


def _ms(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def main(argv=None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    host = host_module.boot(output_dir=os.path.join(args.out, "comfy"), cpu=not torch.cuda.is_available())
    cases, origins = select_cases(host, args)
    for case in cases:
        case.repeats = args.repeats or (1 if args.quick else case.repeats)
        case.threads = args.threads or case.threads
    workflow = cases[0] if args.workflow else None
    case_ids = [c.id for c in cases]
    params, sets = [Param.parse(p) for p in args.param], parse_sets(host, args.sets)
    if args.pack:
        host.load_pack(args.pack)
    for param in params:
        if param.node is not None and param.node not in host.node_classes:
            raise ValueError(f"--param {param.node}.{param.key}: no node class '{param.node}' is loaded")
    names = args.methods or ([workflow_method_name(host, workflow.graphs[0]), *COMFY_NODES] if workflow
                             else DEFAULT_METHODS)
    packs = pack_methods(host, args.pack, args.node, params, case_ids) if args.pack else []
    methods = build_methods(host, names, args.quick, sets, params, case_ids) + packs
    peer_commits = {}
    if args.peers:
        peer_list, peer_commits = peer_methods(host, args.peers, case_ids, args.quick)
        methods += peer_list
    # The slice measures speed only (random weights): every family of ours, at one speed.
    slice_speeds = QUICK_SPEEDS if args.quick else SLICE_SPEEDS
    slice_names = args.methods or (QUICK_SLICE_METHODS if args.quick else SLICE_METHODS)
    slice_methods = build_methods(host, [n for n in slice_names if n not in COMFY_NODES],
                                  args.quick, sets, speeds=slice_speeds) + packs

    def progress(record, seconds):
        if record["status"] != "ok":
            detail = error_summary(record["error"])
        elif record["wallclock_speedup"] is None:  # a speed case times its settings after counting them all
            detail = f"{record['ideal_speedup']:.2f}x ideal (counted; timed after the others)"
        else:
            detail = (f"{record['ideal_speedup']:.2f}x ideal, {record['wallclock_speedup']:.2f}x wall, efficiency "
                      f"{record['efficiency']:.2f}, our overhead {_ms(record['overhead_ms_per_cached_step'])} ms per "
                      f"cached step, PSNR {record['psnr']:.1f}")
        took = "" if seconds is None else f" ({seconds:.1f} s)"
        print(f"  {record['method']} {setting_text(record['setting'])}: {detail}{took}", flush=True)

    records, speed_records = [], []
    fidelity = [case.id for case in cases if not case.fixed_only]
    # side by side in processes (fidelity is what they measure); the slice times speed alone, after them
    parallel = args.jobs > 1 and len(fidelity) > 1 and not (args.workflow or args.peers)
    command = sys.argv[1:] if argv is None else list(argv)
    if parallel:
        print(f"{len(fidelity)} cases in {min(args.jobs, len(fidelity))} processes", flush=True)
        records += run_in_workers(command, fidelity, args.out, args.jobs)
    with SamplerClock() as clock:
        for case in cases:
            if parallel and not case.fixed_only:
                continue
            print(f"{case.model}: {case.name} ({len(case.graphs)} samples)", flush=True)
            if case.fixed_only:
                speed_records += run_speed_case(host, case, slice_methods, clock, progress)
            else:
                records += run_case(host, case, methods, clock, progress)

    context = dict(command="python -m benchmarks.frontier " + " ".join(command),
                   host=host_module.comfyui_path(), device="cuda" if torch.cuda.is_available() else "cpu",
                   seconds=time.perf_counter() - started, date=time.strftime("%Y-%m-%d %H:%M"), models=origins,
                   peers=peer_commits)
    with open(os.path.join(args.out, "frontier.json"), "w") as f:
        json.dump(records + speed_records, f, indent=1, default=str)
    write_markdown(os.path.join(args.out, "frontier.md"), records, speed_records, context)
    write_plot(os.path.join(args.out, "frontier.png"), records or speed_records)
    print("\n" + frontier_table(records + speed_records))
    if speed_records:
        print(speed_table(speed_records) + "\n")
    print(versus_table(records))
    print(f"wrote {args.out}/frontier.json, frontier.md, frontier.png in {context['seconds']:.0f} s")
    return 0


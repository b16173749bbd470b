"""The frontier's outputs: frontier.md (tables) and frontier.png (PSNR vs ideal speedup)."""
from __future__ import annotations

import math

from benchmarks.frontier.measure import PSNR_CAP, RAISED_AT

SPEEDUP_LEVELS = (2.0, 3.0, 4.0, 5.0)


def _fmt(value, spec=".2f", none="—"):
    return none if value is None else format(value, spec)


def setting_text(setting: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in setting.items()) or "defaults"


def best_record(records: list, level: float):
    """The record with the best PSNR at or above an ideal speedup, or None."""
    ok = [r for r in records if r["status"] == "ok" and r["ideal_speedup"] >= level]
    return max(ok, key=lambda r: r["psnr"]) if ok else None


def best_psnr(records: list, level: float):
    best = best_record(records, level)
    return None if best is None else best["psnr"]


def _best_cell(record) -> str:
    if record is None:
        return "—"
    setting = setting_text(record["setting"])
    return f"{record['psnr']:.1f} dB {record['method']} ({setting}, {record['ideal_speedup']:.2f}×)"


def versus_table(records: list) -> str:
    """Per case and speedup level: our best method, the best other pack's, the best of the host's
    built-ins, our margin in dB over the better of the two (positive: ours is better), and the
    no-cache baseline (fewer steps) with our margin over it."""
    lines = []
    for model, case in _cases_in_order(records):
        rows = [r for r in records if (r["model"], r["case"]) == (model, case)]
        if not any(r.get("family") == "ours" for r in rows) or all(r.get("family") == "ours" for r in rows):
            continue
        lines += [f"### {model}: {case}", "", "| ideal speedup | ours: best | best peer pack | best host built-in | "
                  "margin dB | fewer steps, no cache | margin dB |", "|---|---|---|---|---:|---|---:|"]
        for level in SPEEDUP_LEVELS:
            best = {family: best_record([r for r in rows if r.get("family") == family], level)
                    for family in ("ours", "peer", "host", "baseline")}
            margins = [_margin(best["ours"], [best["peer"], best["host"]]), _margin(best["ours"], [best["baseline"]])]
            lines.append(f"| ≥{level:g}× | {_best_cell(best['ours'])} | {_best_cell(best['peer'])} | "
                         f"{_best_cell(best['host'])} | {_fmt(margins[0], '+.1f')} | {_best_cell(best['baseline'])} | "
                         f"{_fmt(margins[1], '+.1f')} |")
        lines.append("")
    return "\n".join(lines)


def _margin(ours, others: list):
    """dB by which our best record beats the best of `others` (None where either side has none)."""
    psnrs = [r["psnr"] for r in others if r is not None]
    return None if ours is None or not psnrs else ours["psnr"] - max(psnrs)


def _cases_in_order(records):
    return list(dict.fromkeys((r["model"], r["case"]) for r in records))


def frontier_table(records: list) -> str:
    """Per case: the best PSNR each method reaches at or above each of SPEEDUP_LEVELS (ideal speedup)."""
    lines = []
    for model, case in _cases_in_order(records):
        rows = [r for r in records if (r["model"], r["case"]) == (model, case)]
        levels = " | ".join(f"best PSNR ≥{x:g}×" for x in SPEEDUP_LEVELS)
        lines += [f"### {model}: {case}", "", f"| method | {levels}"
                  + " | max ideal speedup |", "|---|" + "---:|" * (len(SPEEDUP_LEVELS) + 1)]
        for method in dict.fromkeys(r["method"] for r in rows):
            mine = [r for r in rows if r["method"] == method]
            ok = [r["ideal_speedup"] for r in mine if r["status"] == "ok"]
            cells = [_fmt(best_psnr(mine, x), ".1f") for x in SPEEDUP_LEVELS]
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {_fmt(max(ok) if ok else None)} |")
        lines.append("")
    return "\n".join(lines)


def error_summary(error: str) -> str:
    """One line for a table cell: the error's first line, and the next one when the first only
    announces it (a host validation error's cause follows "invalid prompt:")."""
    message = error.split(RAISED_AT)[0]
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    return f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]


def failures_section(records: list) -> list:
    """Every distinct error in full (frontier.json keeps each record's)."""
    errors = {}
    for r in records:
        if r["status"] != "ok":
            errors.setdefault(r["error"], []).append(f"{r['method']} ({r['case']}, {setting_text(r['setting'])})")
    lines = []
    for error, where in errors.items():
        lines += [f"- {'; '.join(where)}:", "", "```", error, "```", ""]
    return ["## Failures", "", *lines] if lines else []


def records_table(records: list) -> str:
    lines = ["| model | case | method | setting | compute fraction | report fraction | ideal × | wall-clock × | "
             "efficiency | PSNR dB | SSIM | latent PSNR | cache KiB | status |",
             "|---|---|---|---|" + "---:|" * 9 + "---|"]
    for r in records:
        status = r["status"] if r["status"] == "ok" else f"failed: {error_summary(r['error'])}"
        kib = None if r["cache_bytes"] is None else r["cache_bytes"] / 1024
        lines.append(f"| {r['model']} | {r['case']} | {r['method']} | {setting_text(r['setting'])} | "
                     f"{_fmt(r['compute_fraction'], '.3f')} | {_fmt(r['report_fraction'], '.3f')} | "
                     f"{_fmt(r['ideal_speedup'])} | {_fmt(r['wallclock_speedup'])} | "
                     f"{_fmt(r['efficiency'])} | {_fmt(r['psnr'], '.2f')} | {_fmt(r['ssim'], '.4f')} | "
                     f"{_fmt(r['latent_psnr'], '.2f')} | {_fmt(kib, '.1f')} | {status.replace('|', '/')} |")
    return "\n".join(lines)


def speed_table(speed_records: list) -> str:
    lines = ["| method | setting | ideal × | wall-clock × | efficiency | our ms per cached step |",
             "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['method']} | {setting_text(r['setting'])} | {_fmt(r['ideal_speedup'])} | "
              f"{_fmt(r['wallclock_speedup'])} | {_fmt(r['efficiency'])} | "
              f"{_fmt(r.get('overhead_ms_per_cached_step'), '.2f')} |" for r in speed_records]
    return "\n".join(lines)


def write_markdown(path: str, records: list, speed_records: list, context: dict) -> None:
    lines = ["# Feature cache frontier", "",
             f"Command: `{context['command']}`  ", f"Host: ComfyUI at {context['host']}, device {context['device']}  ",
             f"Finished in {context['seconds']:.0f} s on {context['date']}", ""]
    lines += [f"- {kind}: {origin}" for kind, origin in context["models"].items()]
    lines += [f"- peer pack {pack}: commit {commit or 'unknown (not a git checkout)'}"
              for pack, commit in context.get("peers", {}).items()]
    lines += ["", f"PSNR/SSIM: decoded output vs the uncached output of the same graph and seed, mean over the "
              f"samples; {PSNR_CAP:g} dB = identical. Ideal speedup = 1 / compute fraction; wall-clock = median "
              "sampler time of interleaved uncached / cached runs (see benchmarks/frontier/__init__.py). "
              "Tiny models on a shared CPU: wall-clock numbers are indicative; the slice below is the speed "
              "measurement. Compute fraction = the diffusion model's FLOPs in the cached run / the uncached run; "
              "report fraction (ours) = computed block cells / all cells.", "",
              "## Best PSNR at or above an ideal speedup", "", frontier_table(records)]
    versus = versus_table(records)
    if versus:
        lines += ["## Ours vs the best other pack and built-in at each speedup (best PSNR at or above it)", "",
                  versus]
    if speed_records:
        lines += ["## Speed: real-dims slice (efficiency = wall-clock / ideal speedup)", "",
                  "Our ms per cached step: wall time spent in our code (engine, wrappers) in a filled evaluation.", "",
                  speed_table(speed_records), ""]
    lines += ["## All records", "", records_table(records + speed_records), ""]
    lines += failures_section(records + speed_records)
    with open(path, "w") as f:
        f.write("\n".join(lines))


def write_plot(path: str, records: list) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = _cases_in_order(records)
    columns = min(2, len(cases)) or 1
    rows = math.ceil(len(cases) / columns) or 1
    fig, axes = plt.subplots(rows, columns, figsize=(7 * columns, 4.5 * rows), squeeze=False)
    for ax, (model, case) in zip(axes.flat, cases):
        mine = [r for r in records if (r["model"], r["case"]) == (model, case) and r["status"] == "ok"]
        for method in dict.fromkeys(r["method"] for r in mine):
            points = sorted((r["ideal_speedup"], r["psnr"]) for r in mine if r["method"] == method)
            family = next(r.get("family") for r in mine if r["method"] == method)
            style = {"ours": "-", "baseline": ":"}.get(family, "--")  # other packs and built-ins dashed
            ax.plot([p[0] for p in points], [p[1] for p in points], style, marker="o", markersize=3, label=method)
        below_cap = [r["psnr"] for r in mine if r["psnr"] < PSNR_CAP]
        if below_cap:  # identical outputs (PSNR_CAP) would squash the frontier: they run off the top
            ax.set_ylim(min(below_cap) - 2, max(below_cap) + 5)
        ax.set_title(f"{model}: {case}", fontsize=9)
        ax.set_xlabel("ideal speedup (1 / compute fraction)")
        ax.set_ylabel("PSNR vs uncached (dB)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(cases):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


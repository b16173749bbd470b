"""The Cache Map as a readable figure (Cache Map's IMAGE and PNG): title, run summary, the step x block
grid with labelled axes, and a legend with cell counts. Drawn with PIL, which the host ships."""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .progress import NOT_RUN, compact, legend

BACKGROUND = (255, 255, 255)
INK = (30, 30, 30)
FAINT = (120, 120, 120)
NOT_RUN_FILL = (225, 225, 225)
MAX_GRID_HEIGHT = 1600  # a 1000-block video map gets thinner rows, not a 8000-pixel image
MIN_WIDTH = 480
PAD = 10
ROW_LABEL_HEIGHT = 14  # the 11-pixel label font plus a gap


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _rgb(hex_color: str) -> tuple:
    return tuple(int(hex_color[i:i + 2], 16) for i in (1, 3, 5))


def _text_size(draw, text, font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def summary_line(report: dict) -> str:
    speedup = report.get("ideal_speedup")
    parts = [f"compute {100 * report['compute_fraction']:.1f}%",
             f"ideal speedup {speedup:.2f}x" if speedup and math.isfinite(speedup) else "ideal speedup -",
             f"{report['evaluations_computed']}/{report['evaluations']} evaluations computed",
             f"peak cache {report['peak_cache_bytes'] / 2**20:.2f} MiB"]
    if report.get("elapsed_s") is not None:
        parts.insert(2, f"elapsed {report['elapsed_s']:.2f} s")
    return " | ".join(parts)


def row_height(n_rows: int, cell: int) -> int:
    """Tall enough for every row's label while the grid fits MAX_GRID_HEIGHT; thinner rows on deep models."""
    labelled = max(cell, ROW_LABEL_HEIGHT)
    if n_rows * labelled <= MAX_GRID_HEIGHT:
        return labelled
    return cell if n_rows * cell <= MAX_GRID_HEIGHT else max(1, MAX_GRID_HEIGHT // n_rows)


def render_figure(report: dict, cell: int = 8) -> np.ndarray:
    """RGB uint8 figure of a run's report: columns are model evaluations (labelled by step), rows blocks."""
    state = compact(report)
    rows, columns, evaluations = state["header"]["rows"], state["columns"], state["evaluations"]
    colors = {entry["code"]: _rgb(entry["color"]) for entry in legend()}
    colors[NOT_RUN] = NOT_RUN_FILL
    n_rows, n_cols = max(1, len(rows)), max(1, len(columns))
    cw, ch = cell, row_height(n_rows, cell)

    font, small = _font(13), _font(11)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = _text_size(probe, "Ag", font)[1] + 6
    label_w = max(_text_size(probe, name, small)[0] for name in rows or ["model"]) + 8
    threshold = report.get("threshold")
    control = (f"budget {report['budget']:.2f}" if threshold is None and report.get("budget") is not None
               else f"threshold {threshold or 0:.3g}")
    title = (f"Feature cache map: {report.get('method')} ({control}), "
             f"forecaster {report.get('forecaster')}, site {report.get('site')}")
    summary = summary_line(report)
    counts = report.get("cells", {})
    entries = [(_rgb(e["color"]), f"{e['label']} {counts.get(e['action'], 0)}") for e in legend()]
    entries.append((NOT_RUN_FILL, "not run"))

    grid_x, grid_y = PAD + label_w, PAD + 2 * line_h + line_h  # title, summary, y-axis title
    grid_w, grid_h = n_cols * cw, n_rows * ch
    legend_w = sum(_text_size(probe, text, small)[0] + 28 for _, text in entries)
    width = max(MIN_WIDTH, grid_x + grid_w + PAD, PAD + _text_size(probe, title, font)[0] + PAD,
                PAD + _text_size(probe, summary, small)[0] + PAD, PAD + legend_w + PAD)
    height = grid_y + grid_h + 2 * line_h + line_h + PAD  # tick labels, x-axis title, legend

    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.text((PAD, PAD), title, fill=INK, font=font)
    draw.text((PAD, PAD + line_h), summary, fill=FAINT, font=small)
    draw.text((PAD, grid_y - line_h + 2), "block", fill=INK, font=small)

    grid = np.empty((n_rows, n_cols, 3), dtype=np.uint8)
    grid[:] = NOT_RUN_FILL
    for c, column in enumerate(columns):
        for r, code in enumerate(column):
            grid[r, c] = colors[code]
    cells = grid.repeat(ch, axis=0).repeat(cw, axis=1)
    if cw >= 4:
        cells[:, ::cw] = (cells[:, ::cw] * 0.6).astype(np.uint8)
    if ch >= 4:
        cells[::ch, :] = (cells[::ch, :] * 0.6).astype(np.uint8)
    image.paste(Image.fromarray(cells), (grid_x, grid_y))
    draw.rectangle((grid_x - 1, grid_y - 1, grid_x + grid_w, grid_y + grid_h), outline=FAINT)

    label_h = _text_size(probe, "0", small)[1]
    row_every = max(1, math.ceil((label_h + 3) / ch))
    for r in range(0, len(rows), row_every):
        y = grid_y + r * ch + ch // 2 - label_h // 2 - 1
        draw.text((PAD, y), rows[r], fill=INK, font=small)

    tick_w = _text_size(probe, "000", small)[0] + 6
    col_every = max(1, math.ceil(tick_w / cw))
    ticks = sorted(set(range(0, len(columns), col_every)) | ({len(columns) - 1} if columns else set()))
    last_x = -tick_w
    for c in ticks:
        text = str(evaluations[c][0] + 1)
        x = grid_x + c * cw + cw // 2
        if x - last_x < tick_w:
            continue
        draw.line((x, grid_y + grid_h, x, grid_y + grid_h + 3), fill=FAINT)
        draw.text((x - _text_size(probe, text, small)[0] // 2, grid_y + grid_h + 4), text, fill=INK, font=small)
        last_x = x
    axis = "sampler step (one column per model evaluation)"
    draw.text((grid_x, grid_y + grid_h + line_h + 2), axis, fill=INK, font=small)

    x, y = PAD, grid_y + grid_h + 2 * line_h + 4
    for color, text in entries:
        draw.rectangle((x, y + 1, x + 12, y + 13), fill=color, outline=FAINT)
        draw.text((x + 16, y), text, fill=INK, font=small)
        x += _text_size(probe, text, small)[0] + 28
    return np.asarray(image)

"""The trace: every evaluation's decision per row (block or whole model), the source of reports and maps."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

COMPUTED = "computed"
REUSED = "reused"
FORECAST = "forecast"
PARTIAL = "partial"
ACTIONS = (COMPUTED, REUSED, FORECAST, PARTIAL)


@dataclass
class Evaluation:
    index: int
    sigma: float
    step: int
    actions: list
    indicator: Optional[float] = None
    decision: str = COMPUTED
    aside: int = 0  # model calls of another node's pass that ran uncached, apart from the cache


@dataclass
class Trace:
    rows: list
    evaluations: list = field(default_factory=list)

    def begin(self, sigma: float, step: int) -> Evaluation:
        ev = Evaluation(len(self.evaluations), sigma, step, [None] * len(self.rows))
        self.evaluations.append(ev)
        return ev

    def mark(self, row: int, action: str) -> None:
        """Record the action of a row in the current evaluation; a compute in any call wins over a fill."""
        actions = self.evaluations[-1].actions
        if actions[row] != COMPUTED:
            actions[row] = action

    def computed_evaluations(self) -> list[int]:
        return [ev.index for ev in self.evaluations if ev.decision == COMPUTED]

    def compute_fraction(self) -> float:
        cells = [a for ev in self.evaluations for a in ev.actions if a is not None]
        if not cells:
            return 1.0
        return sum(1.0 if a == COMPUTED else 0.0 for a in cells) / len(cells)

    def counts(self) -> dict:
        out = {a: 0 for a in ACTIONS}
        for ev in self.evaluations:
            for a in ev.actions:
                if a is not None:
                    out[a] += 1
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "Trace":
        return cls(list(data["rows"]), [
            Evaluation(e["index"], e["sigma"], e["step"], list(e["actions"]), e.get("indicator"),
                       e.get("decision", COMPUTED), e.get("aside", 0))
            for e in data["evaluations"]])

    def to_dict(self) -> dict:
        return {
            "rows": list(self.rows),
            "evaluations": [
                {"index": ev.index, "sigma": ev.sigma, "step": ev.step, "decision": ev.decision,
                 "indicator": ev.indicator, "actions": list(ev.actions), "aside": ev.aside}
                for ev in self.evaluations
            ],
        }


_COLORS = {
    None: (40, 40, 40),
    COMPUTED: (220, 70, 60),
    REUSED: (70, 130, 220),
    FORECAST: (80, 190, 110),
    PARTIAL: (230, 180, 60),
}


def render_map(trace: Trace, cell: int = 8) -> np.ndarray:
    """Step x layer grid as an RGB uint8 image: columns are evaluations, rows are blocks (top = first)."""
    n_rows, n_cols = max(1, len(trace.rows)), max(1, len(trace.evaluations))
    grid = np.zeros((n_rows, n_cols, 3), dtype=np.uint8)
    grid[:] = _COLORS[None]
    for c, ev in enumerate(trace.evaluations):
        for r, action in enumerate(ev.actions):
            grid[r, c] = _COLORS[action]
    image = grid.repeat(cell, axis=0).repeat(cell, axis=1)
    if cell >= 4:  # thin separators keep single cells readable
        image[::cell, :, :] //= 2
        image[:, ::cell, :] //= 2
    return image

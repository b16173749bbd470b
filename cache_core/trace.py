"""The trace: every evaluation's decision per row (block or whole model), the source of reports and maps."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

COMPUTED = "computed"
REUSED = "reused"
FORECAST = "forecast"
PARTIAL = "partial"
REJECTED = "rejected"  # a draft checked against this block's real output and refused: the block was computed
ACTIONS = (COMPUTED, REUSED, FORECAST, PARTIAL, REJECTED)
WORK = (COMPUTED, REJECTED)  # cells whose block ran in full


@dataclass
class Evaluation:
    index: int
    sigma: float
    step: int
    actions: list
    indicator: Optional[float] = None
    decision: str = COMPUTED
    forced_by: Optional[str] = None  # why this evaluation had to be computed, when not the policy's choice
    share: float = 1.0  # the part of the batch the model ran for (CFG-branch cache: the positive branch only)
    fractions: dict = field(default_factory=dict)  # row -> fraction of its work a partial cell did
    aside: int = 0  # model calls of another node's pass that ran uncached, apart from the cache
    guarded: int = 0  # fills the forecast guard replaced by the last computed value


@dataclass
class Trace:
    rows: list
    evaluations: list = field(default_factory=list)

    def begin(self, sigma: float, step: int) -> Evaluation:
        ev = Evaluation(len(self.evaluations), sigma, step, [None] * len(self.rows))
        self.evaluations.append(ev)
        return ev

    def mark(self, row: int, action: str, fraction: Optional[float] = None) -> None:
        """Record the action of a row in the current evaluation; a compute in any call wins over a fill, and
        a rejected draft stays visible when another call computes the block. A partial cell records the
        fraction of the row's work it did."""
        ev = self.evaluations[-1]
        if ev.actions[row] not in WORK:
            ev.actions[row] = action
            if action == PARTIAL:
                ev.fractions[row] = fraction

    def computed_evaluations(self) -> list[int]:
        return [ev.index for ev in self.evaluations if ev.decision == COMPUTED]

    def compute_fraction(self, with_shares: bool = True) -> float:
        """Full-equivalent cell computations / cells: a partial cell counts at its recorded fraction, every
        cell of an evaluation at the share of the batch the model ran for (`with_shares`)."""
        work = [(ev.share if with_shares else 1.0) * (1.0 if a in WORK else ev.fractions[r] if a == PARTIAL else 0.0)
                for ev in self.evaluations for r, a in enumerate(ev.actions) if a is not None]
        return sum(work) / len(work) if work else 1.0

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
                       e.get("decision", COMPUTED), e.get("forced_by"), e.get("share", 1.0),
                       {int(r): f for r, f in e.get("fractions", {}).items()}, e.get("aside", 0), e.get("guarded", 0))
            for e in data["evaluations"]])

    def to_dict(self) -> dict:
        return {
            "rows": list(self.rows),
            "evaluations": [
                {"index": ev.index, "sigma": ev.sigma, "step": ev.step, "decision": ev.decision,
                 "indicator": ev.indicator, "actions": list(ev.actions), "forced_by": ev.forced_by, "share": ev.share,
                 "fractions": dict(ev.fractions), "aside": ev.aside, "guarded": ev.guarded}
                for ev in self.evaluations
            ],
        }


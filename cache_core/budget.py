"""The compute budget: what the `speed` slider means, and the one controller every policy shares.

`speed` sets a budget, the fraction of the model's block work to do (speed 0 = 1.0, every
evaluation computed, bit-identical output; speed 1 = 0.15), log-linear in between so each step
of the slider multiplies the ideal speedup by the same factor: budget = 0.15 ** speed
(speed 0.25 -> 0.62, 0.5 -> 0.39, 0.75 -> 0.24).

A policy turns its indicator into a value that grows while the cache goes stale (accumulated
change, distance to the last compute, evaluations since the last compute) and is compared with a
threshold. With a budget the controller sets that threshold: it knows how many evaluations the
run has left (from the schedule, and evaluations per step learned as the run goes, so Heun's two
per step are counted) and how many computes the budget still allows, and asks for a compute when
the value reaches (mean increment per evaluation) x (evaluations left / computes left): the
computes go where the indicator grows fastest, and the plan is revised at every evaluation. Two
guards make the total exact: no compute once the budget is spent, and a compute whenever the
evaluations left are no more than the computes still owed.
"""
from __future__ import annotations

import math
from typing import Optional

FASTEST_BUDGET = 0.15


def budget_for_speed(speed: float) -> float:
    """Fraction of the block work to do at this slider position (monotone: 1.0 at 0, 0.15 at 1)."""
    if not 0.0 <= speed <= 1.0:
        raise ValueError(f"speed must be within [0, 1], got {speed}")
    return FASTEST_BUDGET ** speed


class ThresholdGate:
    """The expert override: compute when the policy's value reaches a fixed threshold."""

    budget = None
    compute_share = None

    def __init__(self, threshold: float):
        self.threshold = threshold

    def count(self) -> None:
        pass

    def wants_compute(self, value: float, step: int) -> bool:
        return value >= self.threshold

    def record(self, value: Optional[float], compute: bool) -> None:
        pass

    def overruled(self) -> None:
        pass


class BudgetController:
    """Places computes so that the run's block compute fraction lands on `budget`.

    `fill_cost` is the share of the block work a filled evaluation still does (probe and corrector
    blocks of a span site); `steps` the sampler steps of the schedule.
    """

    SLACK = 0.15  # how far (share of the run's computes) the indicator may move computes from an even spread

    def __init__(self, budget: float, steps: int, fill_cost: float = 0.0):
        if not 0.0 < budget <= 1.0:
            raise ValueError(f"compute budget must be in (0, 1], got {budget}")
        self.budget = budget
        self.steps = max(1, steps)
        self.fill_cost = fill_cost
        self.evaluations = 0  # decided so far, the current one included once wants_compute ran
        self.computes = 0
        self.increments: list[float] = []
        self.previous: Optional[float] = None  # value at the last fill (None after a compute)
        self.threshold: Optional[float] = None  # the last threshold asked, for the trace

    def expected_evaluations(self, step: int) -> int:
        per_step = self.evaluations / (step + 1)
        return max(self.evaluations, round(self.steps * per_step))

    @property
    def compute_share(self) -> float:
        """Computes / evaluations the budget allows, given what a fill still costs."""
        if self.fill_cost >= 1.0:
            return 1.0
        return max(0.0, (self.budget - self.fill_cost) / (1.0 - self.fill_cost))

    def computes_owed(self, total: int) -> float:
        return total * self.compute_share

    def wants_compute(self, value: float, step: int) -> bool:
        if self.budget >= 1.0:
            return True
        total = self.expected_evaluations(step)
        left = total - self.evaluations + 1  # this evaluation included
        owed = self.computes_owed(total) - self.computes
        if owed < 0.5:
            self.threshold = math.inf
            return False
        # the indicator places computes, within a band around evenly spread ones: an indicator that
        # grows late (DiCache's probe, TeaCache's input near the end) must find computes left there
        planned = self.computes_owed(total) * self.evaluations / total
        slack = max(1.0, self.SLACK * self.computes_owed(total))
        if left <= owed or self.computes < planned - slack:
            self.threshold = 0.0
            return True
        if self.computes + 1 > planned + slack:
            self.threshold = math.inf
            return False
        increment = value - (self.previous or 0.0)
        mean = (sum(self.increments) + increment) / (len(self.increments) + 1)
        self.threshold = mean * left / owed
        return value >= self.threshold

    def count(self) -> None:
        """Every evaluation, before its decision: the controller counts them all, forced ones too."""
        self.evaluations += 1

    def record(self, value: Optional[float], compute: bool) -> None:
        if value is not None:
            self.increments.append(value - (self.previous or 0.0))
        self.previous = None if compute else value
        self.computes += int(compute)

    def overruled(self) -> None:
        """A fill the engine turned into a compute after all (no safe forecast)."""
        self.previous = None
        self.computes += 1

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

The `planned` policy needs no indicator: it knows the sigmas of the whole schedule before the run and
chooses its computes there (plan_computes, PlannedGate).
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

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
    blocks of a span site), `compute_cost` the share a computed one does (below 1 where the CFG-branch
    cache runs only the positive branch on most computes); `steps` the sampler steps of the schedule.
    """

    SLACK = 0.15  # how far (share of the run's computes) the indicator may move computes from an even spread

    def __init__(self, budget: float, steps: int, fill_cost: float = 0.0, compute_cost: float = 1.0):
        if not 0.0 < budget <= 1.0:
            raise ValueError(f"compute budget must be in (0, 1], got {budget}")
        self.budget = budget
        self.steps = max(1, steps)
        self.fill_cost = fill_cost
        self.compute_cost = compute_cost
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
        """Computes / evaluations the budget allows, given what a compute and a fill cost."""
        if self.fill_cost >= self.compute_cost:
            return 1.0
        return min(1.0, max(0.0, (self.budget - self.fill_cost) / (self.compute_cost - self.fill_cost)))

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


PLAN_EXPONENT = 2.0


def plan_computes(schedule: list, computes: int, exponent: float = PLAN_EXPONENT) -> list:
    """The steps to compute, planned from the sampler's sigmas so that the fills cost least.

    A step i filled from the values computed up to step c misses the change since sigma_c and acts over
    the step's length sigma_i - sigma_{i+1}: its error in the sample is ~ (sigma_c - sigma_i)^exponent *
    (sigma_i - sigma_{i+1}), exponent 1 for a reused value, 2 for a first-order forecast (the default:
    measured best of 1, 1.5, 2, 3 across the bundled cases with the `auto` forecaster). The plan minimises the sum
    over the filled steps with `computes` computes, the first step always among them (dynamic
    programming over the schedule). On a schedule that spends many steps where sigma barely moves
    (Wan's shifted simple schedule, beta) the computes go to the long steps at the end; on karras,
    whose last steps are tiny, to the start.
    """
    sigmas = np.asarray(schedule, dtype=np.float64)
    n = len(sigmas) - 1
    computes = max(1, min(n, computes))
    lengths = np.abs(sigmas[:-1] - sigmas[1:])
    # gap[c, e]: cost of filling the steps c+1 .. e-1 from a compute at step c (e = n: to the end)
    gap = np.full((n, n + 1), np.inf)
    for c in range(n):
        drift = np.abs(sigmas[c] - sigmas[c + 1:n]) ** exponent * lengths[c + 1:]
        gap[c, c + 1:] = np.concatenate([[0.0], np.cumsum(drift)])
    best = np.full(n, np.inf)  # best[c]: least cost of steps 0..c-1 with the latest compute at c
    best[0] = 0.0
    choices = []
    for _ in range(computes - 1):
        totals = best[:, None] + gap[:, :n]  # [previous compute, next compute]
        choice = totals.argmin(axis=0)
        best = totals[choice, np.arange(n)]
        best[0] = np.inf
        choices.append(choice)
    last = int(np.argmin(best + gap[:, n]))
    plan = [last]
    for choice in reversed(choices):
        plan.append(int(choice[plan[-1]]))
    return sorted(plan)


class PlannedGate:
    """Computes the steps planned from the schedule (plan_computes) for the budget, every evaluation of
    them (a sampler with two evaluations per step computes both)."""

    threshold = None

    def __init__(self, budget: float, schedule: list, fill_cost: float = 0.0, compute_cost: float = 1.0):
        if len(schedule) < 2:
            raise ValueError("a planned gate needs the sampler's schedule (at least two sigmas)")
        self.budget = budget
        self.fill_cost = fill_cost
        self.compute_cost = compute_cost
        self.plan = set(plan_computes(schedule, round((len(schedule) - 1) * self.compute_share)))

    compute_share = BudgetController.compute_share

    def count(self) -> None:
        pass

    def wants_compute(self, value: float, step: int) -> bool:
        return self.budget >= 1.0 or step in self.plan

    def record(self, value: Optional[float], compute: bool) -> None:
        pass

    def overruled(self) -> None:
        pass

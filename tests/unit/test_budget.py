"""The budget controller on synthetic indicator sequences: the compute fraction lands on the budget."""
import itertools
import math

import pytest

from cache_core import budget_for_speed
from cache_core.budget import PLAN_EXPONENT, BudgetController, PlannedGate, plan_computes

SHAPES = {
    "constant": lambda x: 1.0,
    "decreasing": lambda x: math.exp(-4 * x),
    "increasing": lambda x: 0.1 + x * x,
    "u-shaped": lambda x: 0.05 + (2 * x - 1) ** 4,
    "spiky": lambda x: 5.0 if int(x * 40) % 7 == 0 else 0.2,
}


def _fraction(controller: BudgetController, increments: list, per_step: int, fill_cost: float,
              warmup: int = 1, max_consecutive: int = 0) -> float:
    """Drive the controller as the engine does: accumulated value reset at each compute."""
    value, since, work = 0.0, 0, 0.0
    for i, increment in enumerate(increments):
        value += increment
        controller.count()
        forced = i < warmup or (max_consecutive and since >= max_consecutive)
        compute = forced or controller.wants_compute(value, i // per_step)
        controller.record(value, compute)
        work += 1.0 if compute else fill_cost
        value, since = (0.0, 0) if compute else (value, since + 1)
    return work / len(increments)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("scale", [1e-4, 1.0, 300.0])
@pytest.mark.parametrize("steps,per_step", [(20, 1), (30, 1), (50, 1), (25, 2)])
@pytest.mark.parametrize("budget", [0.6, 0.4, 0.25, 0.15])
def test_compute_fraction_lands_on_the_budget(shape, scale, steps, per_step, budget):
    evaluations = steps * per_step
    increments = [scale * SHAPES[shape](i / evaluations) for i in range(evaluations)]
    fraction = _fraction(BudgetController(budget, steps), increments, per_step, 0.0)
    assert abs(fraction - budget) <= 0.05


@pytest.mark.parametrize("budget", [0.5, 0.35])
def test_fills_that_still_run_probe_blocks_are_counted(budget):
    increments = [SHAPES["u-shaped"](i / 30) for i in range(30)]
    assert abs(_fraction(BudgetController(budget, 30, fill_cost=0.25), increments, 1, 0.25) - budget) <= 0.05


def test_computes_go_where_the_indicator_grows():
    """A burst of change in the middle of the run gets the computes, flat stretches get fills."""
    increments = [1.0 if 10 <= i < 20 else 0.01 for i in range(30)]
    controller, computes, value = BudgetController(0.4, 30), [], 0.0
    for i, increment in enumerate(increments):
        value += increment
        controller.count()
        compute = i == 0 or controller.wants_compute(value, i)
        controller.record(value, compute)
        computes.append(compute)
        value = 0.0 if compute else value
    assert sum(computes[10:20]) > sum(computes[20:30]) and sum(computes[10:20]) >= 5


def test_budget_one_computes_everything_and_speed_maps_monotonically():
    controller = BudgetController(1.0, 10)
    assert _fraction(controller, [0.0] * 10, 1, 0.0) == 1.0
    budgets = [budget_for_speed(s / 10) for s in range(11)]
    assert budgets[0] == 1.0 and budgets[-1] == pytest.approx(0.15)
    assert all(a > b for a, b in zip(budgets, budgets[1:]))
    with pytest.raises(ValueError):
        budget_for_speed(1.2)


KARRAS = [1.0, 0.83, 0.69, 0.56, 0.46, 0.37, 0.30, 0.24, 0.19, 0.15, 0.12, 0.09, 0.07, 0.05, 0.04, 0.03, 0.02, 0.0]
SHIFTED = [1.0, 0.995, 0.99, 0.98, 0.97, 0.96, 0.94, 0.92, 0.89, 0.85, 0.79, 0.70, 0.58, 0.40, 0.22, 0.0]


def _fill_cost(schedule, plan, exponent=PLAN_EXPONENT):
    cost, last = 0.0, None
    for i in range(len(schedule) - 1):
        if i in plan:
            last = i
        else:
            cost += abs(schedule[last] - schedule[i]) ** exponent * abs(schedule[i] - schedule[i + 1])
    return cost


@pytest.mark.parametrize("schedule", [KARRAS, SHIFTED])
@pytest.mark.parametrize("computes", [1, 3, 5])
def test_planned_computes_are_the_cheapest_set_of_their_size(schedule, computes):
    plan = plan_computes(schedule, computes)
    assert plan[0] == 0 and len(plan) == len(set(plan)) == computes
    others = [[0, *rest] for rest in itertools.combinations(range(1, len(schedule) - 1), computes - 1)]
    assert _fill_cost(schedule, plan) == pytest.approx(min(_fill_cost(schedule, p) for p in others))


def test_plans_follow_where_the_schedule_moves():
    """karras front-loads its long steps, a shifted schedule back-loads them: the computes go there."""
    assert max(plan_computes(KARRAS, 5)) < len(KARRAS) // 2
    assert min(plan_computes(SHIFTED, 5)[1:]) > len(SHIFTED) // 2


@pytest.mark.parametrize("budget", [0.15, 0.32, 0.5, 1.0])
def test_the_planned_gate_computes_the_budget(budget):
    gate = PlannedGate(budget, KARRAS)
    steps = len(KARRAS) - 1
    computed = sum(gate.wants_compute(0.0, step) for step in range(steps))
    assert computed == (steps if budget == 1.0 else round(steps * budget))


def test_cheaper_computes_buy_more_of_them():
    """With the CFG-branch cache most computes run the positive branch alone (cfg_refresh 3: a compute costs
    (1 + 0.5 + 0.5) / 3 of the model's work on average): the same budget buys 1.5 times the computes."""
    steps = len(KARRAS) - 1
    assert BudgetController(0.3, steps, compute_cost=2 / 3).compute_share == pytest.approx(0.45)
    gate = PlannedGate(0.3, KARRAS, compute_cost=2 / 3)
    assert sum(gate.wants_compute(0.0, step) for step in range(steps)) == round(steps * 0.45)
    assert BudgetController(0.9, steps, compute_cost=0.5).compute_share == 1.0  # never above every evaluation

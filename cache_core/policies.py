"""When to compute: policies decide, per model evaluation, compute vs. fill.

A policy is a frozen config (what the user set) plus a fresh per-run state. The state reads one
cheap indicator tensor chosen by `Policy.indicator` and turns it into a value that grows while the
cache goes stale; the shared gate (cache_core/budget.py) compares it with a threshold: the
expert's `threshold`, or the one the budget controller sets from `speed`.
Common gating (warmup, retention, schedule range, max consecutive fills) lives in the engine; the
state is told every decision so its accumulators stay consistent.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from .budget import BudgetController, PlannedGate, ThresholdGate, budget_for_speed
from .calibration import MagnitudeCurve

# Indicators a site can provide to a policy at its decision point.
NO_INDICATOR = "none"
INPUT = "input"  # the cached region's input (the model input at the whole-model site)
MODULATED_INPUT = "modulated_input"  # timestep-modulated input of the first block (TeaCache)
PROGRESS = "progress"  # position in the schedule, 0 at the first step and 1 at the last (a float)
PROBE_RESIDUAL = "probe_residual"  # residual of the always-computed probe blocks (first-block cache)
PROBE_OUTPUT = "probe_output"  # output of the always-computed probe blocks (DiCache)
PROBE_INDICATORS = (PROBE_RESIDUAL, PROBE_OUTPUT)

# TeaCache's published rescaling polynomials (highest power first), fitted per model on the relative
# L1 change of the indicator against that of the model output. Source: TeaCache (Liu et al., CVPR
# 2025) as shipped in welltop-cn/ComfyUI-TeaCache nodes.py (SUPPORTED_MODELS_COEFFICIENTS).
# Only families whose published indicator is the one our adapter computes are listed: Flux's and
# HunyuanVideo's is the timestep-modulated image input of double block 0, as ours. Wan's published
# polynomials (e.g. 1.3B: 2396.77, -1311.11, 201.33, -8.30, 0.138) are fitted on the time embedding,
# which the Wan block does not receive, so Wan runs on the raw change; LTXV's (21.47, -12.80, 2.31,
# 0.792, 0.00969) on an indicator our LTXV adapter does not compute.
TEACACHE_COEFFICIENTS = {
    "flux": (4.98651651e+02, -2.83781631e+02, 5.58554382e+01, -3.82021401e+00, 2.64230861e-01),
    "hunyuan_video": (7.33226126e+02, -4.01131952e+02, 6.75869174e+01, -3.14987800e+00, 9.61237896e-02),
}

# DiCache's clip of the alignment gain per family (authors' defaults, design note 6).
DICACHE_MAX_GAIN = {"flux": 1.5, "hunyuan_video": 1.5, "wan": 2.0}
DEFAULT_DICACHE_MAX_GAIN = 1.5


# Indicator reductions read every k-th row (token) of large features, k chosen to keep at least this many
# rows: a mean over ~4096 tokens differs from the full one by well under a percent (tests bound it).
SUBSAMPLE_ROWS = 4096


def subsample(x: torch.Tensor) -> torch.Tensor:
    """Every k-th row of x's rows (all dims but the last), k = rows // SUBSAMPLE_ROWS; x itself when small.

    Idempotent (a subsample has fewer than 2 * SUBSAMPLE_ROWS rows), so a state may keep only the subsample
    of a feature it compares later."""
    if x.ndim < 2:
        return x
    rows = x.flatten(0, -2) if x.is_contiguous() else x.reshape(-1, x.shape[-1])
    return rows[:: max(1, rows.shape[0] // SUBSAMPLE_ROWS)]


def kept_rows(x: torch.Tensor, buffer: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A copy of the rows of x the indicator reductions read (its subsample), in `buffer` when it fits: a state
    keeps a few thousand rows of a feature instead of all of it, without an allocation per evaluation."""
    rows = subsample(x.detach())
    fits = buffer is not None and (buffer.shape, buffer.dtype, buffer.device) == (rows.shape, rows.dtype, rows.device)
    if fits:
        return buffer.copy_(rows)
    return rows.clone()


def mean_abs(x: torch.Tensor, minus: Optional[torch.Tensor] = None) -> torch.Tensor:
    """mean |x| (or mean |x - minus|) over the subsample, a float32 0-dim tensor (no synchronisation)."""
    x = subsample(x).float()
    return (x if minus is None else x - subsample(minus).float()).abs().mean()


def relative_l1(current: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """mean |a - b| / mean |b|, a 0-dim tensor (no synchronisation): the change measure TeaCache, first-block
    cache, DiCache and EasyCache share."""
    return mean_abs(current, previous) / mean_abs(previous).clamp_min(1e-12)


@dataclass
class Pending:
    """A value that still needs scalars from the device: the engine reads `scalars` (0-dim tensors) in the
    evaluation's one synchronisation, together with its own, and `finish` turns their host values into the
    value (None: cannot fill yet)."""

    scalars: list
    finish: Callable[[list], Optional[float]]


Measured = Union[None, float, Pending]


def settle(value: Measured) -> Optional[float]:
    """The host value of a measure (reads a Pending's scalars; the engine batches them instead)."""
    return value.finish([float(s) for s in value.scalars]) if isinstance(value, Pending) else value


def polynomial(coefficients: tuple, x: float) -> float:
    """Horner evaluation, highest power first; no coefficients: x itself."""
    if not coefficients:
        return x
    value = 0.0
    for c in coefficients:
        value = value * x + c
    return value


@dataclass(frozen=True)
class Policy:
    """Common settings. `speed` in [0, 1] sets the compute budget (budget.py); `threshold` overrides it."""

    speed: float = 0.5
    threshold: Optional[float] = None  # expert override: a fixed threshold, budget control off
    start_percent: float = 0.0
    end_percent: float = 1.0
    warmup_steps: int = 1
    max_consecutive: int = 0  # 0: unlimited
    retention_ratio: float = 0.0  # this fraction of the first sampler steps is always computed

    method = "base"
    indicator = NO_INDICATOR
    per_segment = False  # True: every cached segment decides on its own (new_state(scope) and a gate each)
    verifies = False  # True: a filled evaluation is checked on one really computed block (PolicyState.accept)

    def __post_init__(self):
        budget_for_speed(self.speed)  # validates the range
        if not 0.0 <= self.start_percent < self.end_percent <= 1.0:
            raise ValueError(
                f"start_percent ({self.start_percent}) must be below end_percent ({self.end_percent}), both in [0, 1]")
        if self.warmup_steps < 0 or self.max_consecutive < 0:
            raise ValueError("warmup_steps and max_consecutive must be >= 0")
        if self.threshold is not None and self.threshold < 0:
            raise ValueError(f"threshold must be >= 0, got {self.threshold}")
        if not 0.0 <= self.retention_ratio < 1.0:
            raise ValueError(f"retention_ratio must be in [0, 1), got {self.retention_ratio}")

    @property
    def budget(self) -> Optional[float]:
        """The compute budget from `speed`; None when the expert threshold is set."""
        return None if self.effective_threshold is not None else budget_for_speed(self.speed)

    @property
    def effective_threshold(self) -> Optional[float]:
        return self.threshold

    def effective_retention(self, compute_share: Optional[float]) -> float:
        """With a budget, the always-computed start takes at most half of the computes it allows (the
        authors' 20% assumes ~2-3x). `compute_share`: computes / evaluations the budget allows."""
        return self.retention_ratio if compute_share is None else min(self.retention_ratio, compute_share / 2)

    def effective_max_consecutive(self, compute_share: Optional[float]) -> int:
        """With a budget, the limit on consecutive fills leaves room to reach it (at least 2 / share - 1)."""
        if compute_share is None or self.max_consecutive == 0:
            return self.max_consecutive
        return max(self.max_consecutive, math.ceil(2.0 / max(compute_share, 1e-3)) - 1)

    def new_gate(self, steps: int, fill_cost: float, schedule: tuple = (), compute_cost: float = 1.0):
        """`schedule`: the sampler's sigmas (the last one 0), for policies that plan from it; `fill_cost` and
        `compute_cost`: the share of the model's work a filled and a computed evaluation do."""
        if self.budget is None:
            return ThresholdGate(self.effective_threshold)
        return BudgetController(self.budget, steps, fill_cost, compute_cost)

    def for_family(self, family: Optional[str]) -> "Policy":
        """This config with the defaults of a model family (from the nodes' adapter) filled in."""
        return self

    @property
    def forecaster_order(self) -> Optional[int]:
        """The Taylor order the method's fills are defined with when no forecaster is chosen (None: any)."""
        return None

    def new_state(self) -> "PolicyState":
        raise NotImplementedError


@dataclass(frozen=True)
class Scope:
    """The part of the model a per-segment decision is for: cached segment `position` of `count`, front first."""

    key: str
    position: int
    count: int


class PolicyState:
    """Per-run state. `measure` gives the value the gate compares (None: cannot fill yet), or a Pending one when
    it needs device scalars (the engine reads them once per evaluation, with its own)."""

    def measure(self, sigma: float, indicator: Optional[torch.Tensor]) -> Measured:
        raise NotImplementedError

    def decided(self, compute: bool) -> None:
        """Told after every decision, forced ones included."""

    def computed(self, sigma: float, indicator: Optional[torch.Tensor], output: torch.Tensor,
                 residual: torch.Tensor) -> None:
        """Called after every compute with the cached region's output and residual (reference chunk)."""

    def observe_probe(self, uuid, residual: torch.Tensor) -> None:
        """Every evaluation of every conditioning at a probe site, before its decision: the probe blocks' residual."""

    def probe_computed(self, uuid, sigma: float) -> None:
        """The conditioning's evaluation whose probe was observed last is computed."""

    def fill_time(self, uuid, sigma: float) -> float:
        """The time at which the forecaster is asked for a fill (DiCache remaps it)."""
        return sigma

    def accept(self, error: float) -> bool:
        """Verifying policies: whether a draft whose verified block has this relative error stands."""
        raise NotImplementedError


@dataclass(frozen=True)
class FixedInterval(Policy):
    """FORA-style: compute one evaluation in every `interval`; with a budget, evenly spaced computes."""

    interval: Optional[int] = None  # expert override of the budget

    method = "fixed"

    def __post_init__(self):
        super().__post_init__()
        if self.interval is not None and self.interval < 1:
            raise ValueError(f"interval must be >= 1, got {self.interval}")

    @property
    def effective_threshold(self) -> Optional[float]:
        if self.interval is not None:
            return float(self.interval)
        return None if self.threshold is None else float(max(1, round(self.threshold)))

    def new_state(self):
        return _CountingState()


@dataclass(frozen=True)
class Planned(FixedInterval):
    """Computes planned from the sampler's sigmas before the run (budget.plan_computes): the steps where
    a fill would cost most (long steps far from the last compute) are computed. Schedule-only, so every
    rank and every run of a schedule decides alike; `threshold` / `interval` fall back to a fixed interval."""

    method = "planned"

    def new_gate(self, steps: int, fill_cost: float, schedule: tuple = (), compute_cost: float = 1.0):
        if self.budget is None or len(schedule) < 2:
            return super().new_gate(steps, fill_cost, schedule, compute_cost)
        return PlannedGate(self.budget, list(schedule), fill_cost, compute_cost)


class _CountingState(PolicyState):
    """Value = evaluations since the last compute, this one included: the gate spaces computes evenly."""

    def __init__(self):
        self.since_compute = None

    def measure(self, sigma, indicator):
        return None if self.since_compute is None else float(self.since_compute + 1)

    def decided(self, compute):
        self.since_compute = 0 if compute else self.since_compute + 1


class _AccumulatedChangeState(PolicyState):
    """Accumulated (rescaled) relative change of the indicator between consecutive evaluations."""

    def __init__(self, coefficients: tuple = ()):
        self.coefficients = coefficients
        self.previous: Optional[torch.Tensor] = None
        self.accumulated = 0.0

    def measure(self, sigma, indicator):
        if indicator is None:
            return None
        change = None if self.previous is None else relative_l1(indicator, self.previous)
        self.previous = kept_rows(indicator, self.previous)
        return None if change is None else Pending([change], self._accumulate)

    def _accumulate(self, values: list) -> float:
        self.accumulated += max(0.0, polynomial(self.coefficients, values[0]))
        return self.accumulated

    def decided(self, compute):
        if compute:
            self.accumulated = 0.0


@dataclass(frozen=True)
class TeaCache(Policy):
    """Accumulated relative-L1 change of the timestep-modulated input; compute when it reaches the threshold.

    `coefficients` (highest power first) rescale the raw change per model family, as in TeaCache;
    none = raw change. The nodes fill in the family's published polynomial (TEACACHE_COEFFICIENTS).
    """

    coefficients: tuple = ()

    method = "teacache"
    indicator = MODULATED_INPUT

    def for_family(self, family):
        if self.coefficients or family not in TEACACHE_COEFFICIENTS:
            return self
        return dataclasses.replace(self, coefficients=TEACACHE_COEFFICIENTS[family])

    def new_state(self):
        return _AccumulatedChangeState(self.coefficients)


@dataclass(frozen=True)
class EasyCache(Policy):
    """Transformation-rate policy: predicted output change = k * input change, k from the last two computes."""

    method = "easycache"
    indicator = INPUT

    def new_state(self):
        return _TransformationRateState()


class _TransformationRateState(PolicyState):
    """The inputs and outputs at computes are kept as their indicator subsample (all the reductions read)."""

    def __init__(self):
        self.input_at_compute: Optional[torch.Tensor] = None
        self.output_at_compute: Optional[torch.Tensor] = None
        self.rate: Optional[float] = None
        self.accumulated = 0.0
        self.pending_input_change: Optional[float] = None
        # (output change on the device, input change) of the latest compute: its rate is read with the next measure
        self.pending_rate: Optional[tuple] = None

    def measure(self, sigma, indicator):
        self.pending_input_change = None
        if self.input_at_compute is None or indicator is None:
            return None
        scalars = [mean_abs(indicator, self.input_at_compute), mean_abs(self.output_at_compute)]
        return Pending(scalars + ([self.pending_rate[0]] if self.pending_rate else []), self._accumulate)

    def _accumulate(self, values: list) -> Optional[float]:
        change, output_norm = values[:2]
        if self.pending_rate:
            rate = values[2] / self.pending_rate[1]
            if math.isfinite(rate):  # an input that barely moved (a solver revisiting a sigma) gives no rate
                self.rate = rate
            self.pending_rate = None
        self.pending_input_change = change
        if self.rate is None:
            return None
        self.accumulated += self.rate * change / max(output_norm, 1e-12)
        return self.accumulated

    def decided(self, compute):
        if compute:
            self.accumulated = 0.0

    def computed(self, sigma, indicator, output, residual):
        if indicator is None:
            return
        if self.output_at_compute is not None and self.pending_input_change:
            self.pending_rate = (mean_abs(output, self.output_at_compute), self.pending_input_change)
        self.input_at_compute = kept_rows(indicator, self.input_at_compute)
        self.output_at_compute = kept_rows(output, self.output_at_compute)


@dataclass(frozen=True)
class FirstBlock(Policy):
    """First-block / DBCache: fill while the probe blocks' residual stays close to the last computed one."""

    method = "first_block"
    indicator = PROBE_RESIDUAL

    def new_state(self):
        return _ProbeResidualState()


class _ProbeResidualState(PolicyState):
    def __init__(self):
        self.residual_at_compute: Optional[torch.Tensor] = None
        self.current: Optional[torch.Tensor] = None

    def measure(self, sigma, indicator):
        self.current = indicator
        if self.residual_at_compute is None or indicator is None:
            return None
        return Pending([relative_l1(indicator, self.residual_at_compute)], lambda values: values[0])

    def decided(self, compute):
        if compute and self.current is not None:
            self.residual_at_compute = kept_rows(self.current, self.residual_at_compute)


@dataclass(frozen=True)
class DiCache(Policy):
    """DiCache: the probe decides when, and its trajectory says how far along the deep residual to fill.

    When: the accumulated relative change of the probe blocks' output between evaluations. How: a
    fill asks the forecaster (linear through the last two computes) at the remapped time
    t' = t(k-1) + g (t(k) - t(k-1)), i.e. out = input + R(k-1) + g (R(k) - R(k-1)), with
    g = mean|p(t) - P(k-1)| / mean|P(k) - P(k-1)| on the probe residuals, clipped to [1, max_gain];
    g = 1 is plain reuse. Each conditioning keeps its own probe history and gain.
    """

    retention_ratio: float = 0.2
    max_gain: Optional[float] = None  # None: the family's default (DICACHE_MAX_GAIN)

    method = "dicache"
    indicator = PROBE_OUTPUT

    def __post_init__(self):
        super().__post_init__()
        if self.max_gain is not None and self.max_gain < 1.0:
            raise ValueError(f"DiCache max_gain must be >= 1 (1 = plain reuse), got {self.max_gain}")

    @property
    def forecaster_order(self):
        return 1  # the aligned fill is linear through the last two computes

    def for_family(self, family):
        if self.max_gain is not None:
            return self
        return dataclasses.replace(self, max_gain=DICACHE_MAX_GAIN.get(family, DEFAULT_DICACHE_MAX_GAIN))

    def new_state(self):
        return _ProbeAlignedState(self.max_gain or DEFAULT_DICACHE_MAX_GAIN)


class _ProbeTrajectory:
    """One conditioning's probe residuals: at its last two computes and now, and the gain of now once read."""

    def __init__(self):
        self.computed: list = []  # [(sigma, residual)], oldest first, at most two
        self.current: Optional[torch.Tensor] = None
        self.gain: Optional[float] = None

    def gain_scalars(self) -> Optional[list]:
        """[mean|P(k) - P(k-1)|, mean|p - P(k-1)|] on the device; None before two computes."""
        if len(self.computed) < 2 or self.current is None:
            return None
        (_, before), (_, last) = self.computed
        return [(last - before).abs().mean(), (self.current - before).abs().mean()]


class _ProbeAlignedState(_AccumulatedChangeState):
    def __init__(self, max_gain: float):
        super().__init__()
        self.max_gain = max_gain
        self.trajectories: dict = {}
        self.observed: list = []  # trajectories observed since the last measure

    def observe_probe(self, uuid, residual):
        trajectory = self.trajectories.setdefault(uuid, _ProbeTrajectory())
        trajectory.current, trajectory.gain = residual.detach().clone(), None
        self.observed.append(trajectory)

    def probe_computed(self, uuid, sigma):
        trajectory = self.trajectories[uuid]
        trajectory.computed = (trajectory.computed + [(sigma, trajectory.current)])[-2:]

    def measure(self, sigma, indicator):
        """The accumulated change; the gains of the conditionings observed for this decision are read in the
        same synchronisation (a conditioning called later reads its own in `gain`)."""
        value = super().measure(sigma, indicator)
        waiting = [(t, scalars) for t in self.observed if (scalars := t.gain_scalars()) is not None]
        self.observed = []
        if not waiting:
            return value
        own = value.scalars if value is not None else []

        def finish(values: list) -> Optional[float]:
            for i, (trajectory, _) in enumerate(waiting):
                self._set_gain(trajectory, *values[len(own) + 2 * i: len(own) + 2 * i + 2])
            return value.finish(values[:len(own)]) if value is not None else None
        return Pending(own + [s for _, scalars in waiting for s in scalars], finish)

    def _set_gain(self, trajectory: _ProbeTrajectory, span: float, moved: float) -> None:
        trajectory.gain = 1.0 if span <= 0.0 or not math.isfinite(span) else min(max(moved / span, 1.0),
                                                                                 self.max_gain)

    def gain(self, uuid) -> float:
        trajectory = self.trajectories.get(uuid)
        scalars = None if trajectory is None else trajectory.gain_scalars()
        if scalars is None:
            return 1.0
        if trajectory.gain is None:
            self._set_gain(trajectory, *torch.stack(scalars).tolist())
        return trajectory.gain

    def fill_time(self, uuid, sigma):
        trajectory = self.trajectories.get(uuid)
        if trajectory is None or not trajectory.computed:
            return sigma
        if len(trajectory.computed) < 2:
            return trajectory.computed[-1][0]
        (t_before, _), (t_last, _) = trajectory.computed
        return t_before + self.gain(uuid) * (t_last - t_before)


@dataclass(frozen=True)
class MagCache(Policy):
    """MagCache: the calibrated magnitude ratio of the cached residual between evaluations decides.

    Filling keeps the error |1 - prod gamma| of the skipped evaluations; their sum is the value.
    `ratios` is the calibrated curve (calibration.MagnitudeCurve) for this run's schedule, set by the
    nodes from the stored calibration; without one the run computes every evaluation and records
    the curve (`calibrating`), so the output equals the uncached run.
    """

    retention_ratio: float = 0.2
    max_consecutive: int = 4
    curve: Optional[tuple] = None  # ((sigma, cumulative log ratio), ...), sigma descending

    method = "magcache"
    indicator = NO_INDICATOR

    @property
    def calibrating(self) -> bool:
        return self.curve is None

    def new_state(self):
        return _MagnitudeState(self.curve)


class _MagnitudeState(PolicyState):
    def __init__(self, curve: Optional[tuple]):
        self.curve = None if curve is None else MagnitudeCurve(curve)
        self.recorder = MagnitudeCurve.recorder() if curve is None else None
        self.previous_sigma: Optional[float] = None
        self.product = 1.0
        self.error = 0.0

    def measure(self, sigma, indicator):
        previous, self.previous_sigma = self.previous_sigma, sigma
        if self.curve is None or previous is None:
            return None
        self.product *= self.curve.ratio(previous, sigma)
        self.error += abs(1.0 - self.product)
        return self.error

    def decided(self, compute):
        if compute:
            self.product, self.error = 1.0, 0.0

    def computed(self, sigma, indicator, output, residual):
        if self.recorder is not None:
            self.recorder.add(sigma, residual)

    @property
    def recorded(self):
        return None if self.recorder is None else self.recorder.curve()


@dataclass(frozen=True)
class Foresight(Policy):
    """Foresight: each block reuses its cached residual while its own input stays within its own threshold.

    A segment's value is the relative L1 change of its input since its last compute, in units of its
    own change per evaluation: measured over the first `calibration_steps` evaluations (all
    computed), then updated at every compute (the change since the previous compute / the
    evaluations between them, averaged with the previous rate), so a schedule whose steps shrink
    (karras) keeps the unit honest. Each segment has its own gate (budget or expert threshold, in
    those units): deep and shallow blocks drift at different rates, so one global threshold would
    either freeze some or never skip others.
    """

    calibration_steps: int = 3

    method = "foresight"
    indicator = INPUT
    per_segment = True

    def __post_init__(self):
        super().__post_init__()
        if self.calibration_steps < 1:
            raise ValueError(f"calibration_steps must be >= 1, got {self.calibration_steps}")

    def new_state(self, scope: Scope):
        return _LayerChangeState(self.calibration_steps)


class _LayerChangeState(PolicyState):
    def __init__(self, calibration_steps: int):
        self.calibration_steps = calibration_steps
        self.rates: list[float] = []
        self.rate: Optional[float] = None
        self.input_at_compute: Optional[torch.Tensor] = None
        self.since_compute = 0
        self.pending: tuple = (None, None)  # (indicator, change) of the evaluation being decided

    def measure(self, sigma, indicator):
        if indicator is None:
            return None
        self.since_compute += 1
        self.pending = (indicator, None)
        if self.input_at_compute is None:
            return None
        change = relative_l1(indicator, self.input_at_compute)
        return Pending([change], lambda values: self._value(indicator, values[0]))

    def _value(self, indicator: torch.Tensor, change: float) -> Optional[float]:
        self.pending = (indicator, change)
        return None if self.rate is None else change / max(self.rate, 1e-12)

    def decided(self, compute):
        indicator, change = self.pending
        if not compute or indicator is None:
            return
        if change is not None:
            rate = change / self.since_compute
            if self.rate is None:
                self.rates.append(rate)
                if len(self.rates) >= self.calibration_steps:
                    self.rate = sum(self.rates) / len(self.rates)
            else:
                self.rate = 0.5 * (self.rate + rate)
        self.input_at_compute = kept_rows(indicator, self.input_at_compute)
        self.since_compute = 0


@dataclass(frozen=True)
class Delta(FixedInterval):
    """Δ-DiT: a window of blocks is filled between computes; the blocks outside it always run.

    The window covers a `window` fraction of the cached segments and slides with the schedule from
    the rear blocks (early steps, where the front blocks shape the outline) to the front blocks
    (late steps, where the rear blocks refine details). Inside it each segment is spaced like
    `fixed` (evenly spaced computes for the budget, or one in every `interval`); the window is
    half the segments at speed 0 up to all at speed 1.
    """

    window: Optional[float] = None

    method = "delta"
    indicator = PROGRESS
    per_segment = True

    def __post_init__(self):
        super().__post_init__()
        if self.window is not None and not 0.0 < self.window <= 1.0:
            raise ValueError(f"window must be in (0, 1], got {self.window}")

    @property
    def effective_window(self) -> float:
        return self.window if self.window is not None else 0.5 + 0.5 * self.speed

    def window_positions(self, progress: float, count: int) -> range:
        """The cached segment positions filled at `progress` (0: first step, 1: last) out of `count`."""
        size = max(1, min(count, math.ceil(self.effective_window * count - 1e-9)))
        start = round((1.0 - progress) * (count - size))
        return range(start, start + size)

    def new_state(self, scope: Scope):
        return _SlidingWindowState(self, scope)


class _SlidingWindowState(_CountingState):
    def __init__(self, policy: Delta, scope: Scope):
        super().__init__()
        self.policy = policy
        self.scope = scope

    def measure(self, sigma, indicator):
        value = super().measure(sigma, indicator)
        inside = self.scope.position in self.policy.window_positions(indicator, self.scope.count)
        return value if inside else None  # outside the window: always computed


@dataclass(frozen=True)
class SpeCa(Policy):
    """SpeCa: draft every evaluation with the forecaster, verify it on one block computed from its real input.

    The verified block is the first cached block (everything before it ran, so its input is real and
    a rejection recomputes the rest of the evaluation with no work lost). The draft stands while the
    block's relative output error stays within a tolerance that decays across the schedule from
    `threshold` (default speed * `speed_to_tolerance`) to `decay` times that (late steps shape
    details, so they must be more exact). The verification is the gate: no budget controller.
    """

    decay: float = 0.5

    method = "speca"
    indicator = PROGRESS
    verifies = True
    speed_to_tolerance = 0.2

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 < self.decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {self.decay}")

    @property
    def tolerance(self) -> float:
        return self.threshold if self.threshold is not None else self.speed * self.speed_to_tolerance

    @property
    def budget(self) -> Optional[float]:
        return None

    def threshold_at(self, progress: float) -> float:
        return self.tolerance * self.decay ** progress

    def new_gate(self, steps: int, fill_cost: float, schedule: tuple = (), compute_cost: float = 1.0):
        return ThresholdGate(math.inf)  # draft whenever the engine does not force a compute

    def new_state(self):
        return _VerifiedDraftState(self)


class _VerifiedDraftState(PolicyState):
    def __init__(self, policy: SpeCa):
        self.policy = policy
        self.tolerance = 0.0

    def measure(self, sigma, indicator):
        progress = indicator
        self.tolerance = self.policy.threshold_at(progress)
        return None if self.tolerance <= 0.0 else progress  # no tolerance (speed 0): compute

    def accept(self, error):
        return error <= self.tolerance


POLICIES = {cls.method: cls for cls in (FixedInterval, Planned, TeaCache, EasyCache, FirstBlock, DiCache, MagCache,
                                        Foresight, Delta, SpeCa)}


"""When to compute: policies decide, per model evaluation, compute vs. fill.

A policy is a frozen config (what the user set) plus a fresh per-run state. The state reads one
cheap indicator tensor chosen by `Policy.indicator` and returns (compute?, indicator value).
Common gating (warmup, schedule range, max consecutive fills) lives in the engine, not here;
the state is told when the engine forces a compute so its accumulators stay consistent.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

# Indicators a site can provide to a policy at its decision point.
NO_INDICATOR = "none"
INPUT = "input"  # the cached region's input (the model input at the whole-model site)
MODULATED_INPUT = "modulated_input"  # timestep-modulated input of the first block (TeaCache)
PROBE_RESIDUAL = "probe_residual"  # residual of the always-computed probe blocks (first-block cache)


def relative_l1(current: torch.Tensor, previous: torch.Tensor) -> float:
    """mean |a - b| / mean |b|: the change measure TeaCache, first-block cache and EasyCache share."""
    denom = previous.abs().mean()
    return float((current - previous).abs().mean() / denom.clamp_min(1e-12))


@dataclass(frozen=True)
class Policy:
    """Common settings. `speed` in [0, 1] maps to the method's threshold; 0 computes every step."""

    speed: float = 0.5
    threshold: Optional[float] = None  # overrides the speed mapping when set
    start_percent: float = 0.0
    end_percent: float = 1.0
    warmup_steps: int = 1
    max_consecutive: int = 0  # 0: unlimited

    method = "base"
    indicator = NO_INDICATOR
    speed_to_threshold = 1.0  # threshold at speed 1

    def __post_init__(self):
        if not 0.0 <= self.speed <= 1.0:
            raise ValueError(f"speed must be within [0, 1], got {self.speed}")
        if not 0.0 <= self.start_percent < self.end_percent <= 1.0:
            raise ValueError(
                f"start_percent ({self.start_percent}) must be below end_percent ({self.end_percent}), both in [0, 1]")
        if self.warmup_steps < 0 or self.max_consecutive < 0:
            raise ValueError("warmup_steps and max_consecutive must be >= 0")
        if self.threshold is not None and self.threshold < 0:
            raise ValueError(f"threshold must be >= 0, got {self.threshold}")

    @property
    def effective_threshold(self) -> float:
        return self.threshold if self.threshold is not None else self.speed * self.speed_to_threshold

    def new_state(self) -> "PolicyState":
        raise NotImplementedError


class PolicyState:
    def decide(self, indicator: Optional[torch.Tensor], forced: bool) -> tuple[bool, Optional[float]]:
        raise NotImplementedError

    def computed(self, indicator: Optional[torch.Tensor], output: torch.Tensor) -> None:
        """Called after every compute with the cached region's output (reference chunk)."""


@dataclass(frozen=True)
class FixedInterval(Policy):
    """FORA-style: compute one evaluation in every `interval`; speed 1 means interval 6."""

    interval: Optional[int] = None  # overrides the speed mapping when set

    method = "fixed"
    max_interval = 6

    def __post_init__(self):
        super().__post_init__()
        if self.interval is not None and self.interval < 1:
            raise ValueError(f"interval must be >= 1, got {self.interval}")

    @property
    def effective_interval(self) -> int:
        if self.interval is not None:
            return self.interval
        if self.threshold is not None:
            return max(1, round(self.threshold))
        return 1 + round(self.speed * (self.max_interval - 1))

    @property
    def effective_threshold(self) -> float:
        return float(self.effective_interval - 1)

    def new_state(self):
        return _FixedIntervalState(self.effective_interval)


class _FixedIntervalState(PolicyState):
    def __init__(self, interval: int):
        self.interval = interval
        self.since_compute = interval - 1  # the first evaluation computes

    def decide(self, indicator, forced):
        compute = forced or self.since_compute + 1 >= self.interval
        self.since_compute = 0 if compute else self.since_compute + 1
        return compute, float(self.since_compute)


@dataclass(frozen=True)
class TeaCache(Policy):
    """Accumulated relative-L1 change of the timestep-modulated input; compute when it reaches the threshold.

    `coefficients` (highest power first) rescale the raw change per model, as in TeaCache; none = raw.
    """

    coefficients: tuple = ()

    method = "teacache"
    indicator = MODULATED_INPUT
    speed_to_threshold = 0.8

    def new_state(self):
        return _AccumulatedChangeState(self.effective_threshold, self.coefficients)


class _AccumulatedChangeState(PolicyState):
    def __init__(self, threshold: float, coefficients: tuple):
        self.threshold = threshold
        self.coefficients = coefficients
        self.previous: Optional[torch.Tensor] = None
        self.accumulated = 0.0

    def _rescale(self, change: float) -> float:
        if not self.coefficients:
            return change
        value = 0.0
        for c in self.coefficients:
            value = value * change + c
        return value

    def decide(self, indicator, forced):
        first = self.previous is None
        if not first and indicator is not None:
            self.accumulated += self._rescale(relative_l1(indicator, self.previous))
        self.previous = None if indicator is None else indicator.detach().clone()
        value = self.accumulated
        compute = forced or first or self.accumulated >= self.threshold
        if compute:
            self.accumulated = 0.0
        return compute, value


@dataclass(frozen=True)
class EasyCache(Policy):
    """Transformation-rate policy: predicted output change = k * input change, k from the last two computes."""

    method = "easycache"
    indicator = INPUT
    speed_to_threshold = 0.1

    def new_state(self):
        return _TransformationRateState(self.effective_threshold)


class _TransformationRateState(PolicyState):
    def __init__(self, threshold: float):
        self.threshold = threshold
        self.input_at_compute: Optional[torch.Tensor] = None
        self.output_at_compute: Optional[torch.Tensor] = None
        self.rate: Optional[float] = None
        self.accumulated = 0.0
        self.pending_input_change: Optional[float] = None

    def decide(self, indicator, forced):
        value = None
        self.pending_input_change = None
        if self.input_at_compute is not None and indicator is not None:
            self.pending_input_change = float((indicator - self.input_at_compute).abs().mean())
            if self.rate is not None:
                output_norm = float(self.output_at_compute.abs().mean())
                self.accumulated += self.rate * self.pending_input_change / max(output_norm, 1e-12)
                value = self.accumulated
        compute = forced or value is None or self.accumulated >= self.threshold
        if compute:
            self.accumulated = 0.0
        return compute, value

    def computed(self, indicator, output):
        if indicator is None:
            return
        if self.output_at_compute is not None and self.pending_input_change:
            rate = float((output - self.output_at_compute).abs().mean()) / self.pending_input_change
            if math.isfinite(rate):  # an input that barely moved (a solver revisiting a sigma) gives no rate
                self.rate = rate
        self.input_at_compute = indicator.detach().clone()
        self.output_at_compute = output.detach().clone()


@dataclass(frozen=True)
class FirstBlock(Policy):
    """First-block / DBCache: fill while the probe blocks' residual stays close to the last computed one."""

    method = "first_block"
    indicator = PROBE_RESIDUAL
    speed_to_threshold = 0.24

    def new_state(self):
        return _ProbeResidualState(self.effective_threshold)


class _ProbeResidualState(PolicyState):
    def __init__(self, threshold: float):
        self.threshold = threshold
        self.residual_at_compute: Optional[torch.Tensor] = None

    def decide(self, indicator, forced):
        value = None
        if self.residual_at_compute is not None and indicator is not None:
            value = relative_l1(indicator, self.residual_at_compute)
        compute = forced or value is None or value >= self.threshold
        if compute and indicator is not None:
            self.residual_at_compute = indicator.detach().clone()
        return compute, value


POLICIES = {cls.method: cls for cls in (FixedInterval, TeaCache, EasyCache, FirstBlock)}


def make_policy(method: str, **settings) -> Policy:
    if method not in POLICIES:
        raise ValueError(f"unknown cache policy '{method}'; available: {', '.join(POLICIES)}")
    return POLICIES[method](**settings)

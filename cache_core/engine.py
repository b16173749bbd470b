"""The per-run engine: one CacheRun per sampling run, shared by every model call of that run.

Decisions are taken once per model evaluation from one reference conditioning (the first uuid of
the run), so cond and uncond batched together or run in separate calls take the same decisions.
Caches are kept per conditioning uuid and per key (a block segment or the whole model).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .forecasters import ForecasterConfig, TaylorForecaster
from .policies import NO_INDICATOR, PROBE_INDICATORS, FixedInterval, Policy
from .sites import Site
from .tokens import TokenConfig
from .trace import COMPUTED, FORECAST, REUSED, Trace

log = logging.getLogger("FeatureCache")
BUDGET_TOLERANCE = 0.05


@dataclass(frozen=True)
class CacheConfig:
    policy: Policy = field(default_factory=FixedInterval)
    forecaster: ForecasterConfig = field(default_factory=ForecasterConfig)
    site: Site = field(default_factory=Site)
    tokens: Optional[TokenConfig] = None
    offload_to_cpu: bool = False
    memory_budget_mb: float = 0.0  # 0: unlimited

    def __post_init__(self):
        if self.policy.indicator in PROBE_INDICATORS and self.site.probe_blocks < 1:
            raise ValueError(
                f"the '{self.policy.method}' policy reads the always-computed probe blocks, which the "
                f"'{self.site.kind}' site with probe_blocks {self.site.probe_blocks} does not have: on Apply Feature "
                "Cache set site to 'span' or 'blocks' with probe_blocks >= 1")
        if self.memory_budget_mb < 0:
            raise ValueError("memory_budget_mb must be >= 0 (0 means unlimited)")
        if self.tokens is not None and not self.site.uses_blocks:
            raise ValueError("token-level recompute needs a block site ('span' or 'blocks'), not 'model'")

    def describe(self) -> dict:
        return {
            "method": self.policy.method,
            "threshold": self.policy.effective_threshold,
            "forecaster": self.forecaster.label,
            "site": self.site.kind,
            "probe_blocks": self.site.probe_blocks,
            "corrector_blocks": self.site.corrector_blocks,
        }


def chunk(tensor: torch.Tensor, n: int, i: int) -> torch.Tensor:
    """The i-th of n equal batch chunks (one per conditioning uuid)."""
    size = tensor.shape[0] // n
    return tensor[i * size:(i + 1) * size]


class CacheRun:
    def __init__(self, config: CacheConfig, rows: list[str], schedule: list[float],
                 active_range: tuple[float, float] = (float("inf"), 0.0)):
        self.config = config
        self.schedule = [float(s) for s in schedule]
        self.active_high, self.active_low = active_range
        self.trace = Trace(rows)
        self.notes: list[str] = []
        self.peak_bytes = 0
        self.over_budget = False
        self._budget_noted = False
        self._reset_state()

    @property
    def fill_cost(self) -> float:
        """Share of the block work a filled evaluation still does (the probe and corrector blocks)."""
        site = self.config.site
        return (site.probe_blocks + site.corrector_blocks) / len(self.trace.rows) if site.uses_blocks else 0.0

    @property
    def steps(self) -> int:
        return max(1, len(self.schedule) - 1)

    def _reset_state(self):
        self.policy_state = self.config.policy.new_state()
        self.gate = self.config.policy.new_gate(self.steps, self.fill_cost)
        self.forecasters: dict = {}
        self.cache_bytes = 0
        self.ref_uuid = None
        self.signature = None
        self.decision: Optional[bool] = None
        self.indicator = None
        self.consecutive_fills = 0
        self.uuids: list = []

    # -- calls and evaluations -------------------------------------------------------------
    def begin_call(self, uuids: list, sigma: float, sample: torch.Tensor) -> None:
        """Start of one model call; detects a new evaluation and shape/dtype/device changes."""
        signature = (tuple(chunk(sample, len(uuids), 0).shape), sample.dtype, sample.device)
        if self.signature is not None and signature != self.signature:
            self._note(f"input changed from {self.signature} to {signature}: caches reset")
            self._reset_state()
        self.signature = signature
        if self.ref_uuid is None:
            self.ref_uuid = uuids[0]
        current = self.trace.evaluations[-1] if self.trace.evaluations else None
        ref_decided_again = self.ref_uuid in uuids and self.decision is not None
        if current is None or sigma != current.sigma or ref_decided_again:
            self.trace.begin(sigma, self._step_of(sigma))
            self.decision = None
        self.uuids = list(uuids)

    @property
    def sigma(self) -> float:
        return self.trace.evaluations[-1].sigma

    def _step_of(self, sigma: float) -> int:
        steps = self.schedule[:-1] or [sigma]
        return min(range(len(steps)), key=lambda i: abs(steps[i] - sigma))

    def _forced(self) -> bool:
        ev = self.trace.evaluations[-1]
        policy = self.config.policy
        return (self.over_budget
                or ev.index < policy.warmup_steps
                or ev.step < int(policy.effective_retention(self.gate.compute_share) * self.steps)
                or not (self.active_high >= ev.sigma > self.active_low)
                or 0 < policy.effective_max_consecutive(self.gate.compute_share) <= self.consecutive_fills)

    def decide(self, keys: list, indicator: Callable[[str], Optional[torch.Tensor]]) -> bool:
        """True to compute. `keys` are the cached values a fill would need for every uuid of the call."""
        if self.decision is None and self.ref_uuid in self.uuids:
            kind = self.config.policy.indicator
            self.indicator = None if kind == NO_INDICATOR else indicator(kind)
            forced = self._forced() or not self._has_caches(keys, [self.ref_uuid])
            ev = self.trace.evaluations[-1]
            value = self.policy_state.measure(ev.sigma, self.indicator)
            self.gate.count()
            compute = forced or value is None or self.gate.wants_compute(value, ev.step)
            self.gate.record(value, compute)
            self.policy_state.decided(compute)
            self.decision = compute
            ev.indicator = value
            ev.decision = COMPUTED if compute else self.fill_action
            self.consecutive_fills = 0 if compute else self.consecutive_fills + 1
        if self.decision is None:  # the reference conditioning has not been seen in this evaluation
            return True
        return self.decision or not self._has_caches(keys, self.uuids)

    def computed(self, output_ref: torch.Tensor, residual_ref: torch.Tensor) -> None:
        """Feed the policy the reference chunk's output and residual of a computed evaluation."""
        if self.ref_uuid in self.uuids and self.decision:
            self.policy_state.computed(self.sigma, self.indicator, output_ref, residual_ref)

    def observe_probe(self, residual: torch.Tensor, computed: bool) -> None:
        """The probe blocks' residual of every conditioning of the call, and whether the call computes."""
        for i, uuid in enumerate(self.uuids):
            self.policy_state.observe_probe(uuid, self.sigma, chunk(residual, len(self.uuids), i), computed)

    @property
    def fill_action(self) -> str:
        return REUSED if self.config.forecaster.order == 0 else FORECAST

    def mark(self, row: int, action: str) -> None:
        self.trace.mark(row, action)

    # -- caches --------------------------------------------------------------------------
    def _has_caches(self, keys, uuids) -> bool:
        return all((k, u) in self.forecasters for k in keys for u in uuids)

    def store(self, key, values: torch.Tensor) -> None:
        """Record a computed value (batched over the call's uuids) at the current sigma."""
        if self.over_budget:
            return
        n = len(self.uuids)
        for i, uuid in enumerate(self.uuids):
            forecaster = self.forecasters.get((key, uuid))
            if forecaster is None:
                store_device = torch.device("cpu") if self.config.offload_to_cpu else None
                forecaster = TaylorForecaster(self.config.forecaster.order, store_device)
                self.forecasters[(key, uuid)] = forecaster
            before = forecaster.nbytes
            forecaster.update(self.sigma, chunk(values, n, i))
            self.cache_bytes += forecaster.nbytes - before
        self.peak_bytes = max(self.peak_bytes, self.cache_bytes)
        budget = self.config.memory_budget_mb * 2**20
        if budget and self.cache_bytes > budget:
            self._note(f"cache memory {self.cache_bytes / 2**20:.1f} MiB exceeded the budget of "
                       f"{self.config.memory_budget_mb} MiB: caching stopped for the rest of this run")
            self.over_budget = True
            self.forecasters.clear()
            self.cache_bytes = 0

    def fill(self, key, like: torch.Tensor) -> torch.Tensor:
        """The forecast value of `key` at the current sigma for every uuid of the call, batched like `like`."""
        parts = [self.forecasters[(key, u)].predict(self.policy_state.fill_time(u, self.sigma), like.device)
                 for u in self.uuids]
        return torch.cat(parts, dim=0)

    def reference_chunk(self, tensor: torch.Tensor) -> Optional[torch.Tensor]:
        if self.ref_uuid not in self.uuids:
            return None
        return chunk(tensor, len(self.uuids), self.uuids.index(self.ref_uuid))

    # -- report --------------------------------------------------------------------------
    def _note(self, message: str) -> None:
        log.warning("FeatureCache: %s", message)
        self.notes.append(message)

    def report(self) -> dict:
        fraction = self.trace.compute_fraction()
        budget = self.gate.budget
        if budget is not None and abs(fraction - budget) > BUDGET_TOLERANCE and not self._budget_noted:
            self._budget_noted = True
            self._note(f"compute fraction {fraction:.3f} missed the budget {budget:.3f}: forced computes (warmup, "
                       "retention, start/end, max consecutive, policy needing data) or the always-computed probe/"
                       "corrector blocks set a floor above it, or the run's evaluations differed from the schedule's")
        decisions = [ev.decision for ev in self.trace.evaluations]
        return {
            **self.config.describe(),
            "evaluations": len(decisions),
            "evaluations_computed": sum(d == COMPUTED for d in decisions),
            "evaluations_filled": sum(d != COMPUTED for d in decisions),
            "cells": self.trace.counts(),
            "budget": self.gate.budget,
            "compute_fraction": fraction,
            "ideal_speedup": (1.0 / fraction) if fraction > 0 else float("inf"),
            "peak_cache_bytes": self.peak_bytes,
            "notes": list(self.notes),
            "trace": self.trace.to_dict(),
        }

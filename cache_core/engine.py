"""The per-run engine: one CacheRun per sampling run, shared by every model call of that run.

Decisions are taken once per model evaluation from one reference conditioning (the first uuid of
the run), so cond and uncond batched together or run in separate calls take the same decisions.
Caches are kept per conditioning uuid and per key (a block segment or the whole model).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .forecasters import ForecasterConfig
from .grid import TokenGrid, grid_for
from .policies import NO_INDICATOR, PROBE_RESIDUAL, FixedInterval, Policy
from .sites import Site
from .tokens import TokenConfig
from .trace import COMPUTED, FORECAST, REUSED, Trace

log = logging.getLogger("FeatureCache")
# A fill's forecast must have a norm within [min / GUARD_BAND, max * GUARD_BAND] of the norms of the
# values computed for it so far; outside (or not finite) it is an overshoot and reuse replaces it.
GUARD_BAND = 2.0


@dataclass(frozen=True)
class CacheConfig:
    policy: Policy = field(default_factory=FixedInterval)
    forecaster: ForecasterConfig = field(default_factory=ForecasterConfig)
    site: Site = field(default_factory=Site)
    tokens: Optional[TokenConfig] = None
    offload_to_cpu: bool = False
    memory_budget_mb: float = 0.0  # 0: unlimited

    def __post_init__(self):
        if self.policy.indicator == PROBE_RESIDUAL and self.site.probe_blocks < 1:
            raise ValueError(
                f"the '{self.policy.method}' policy reads the residual of probe blocks: use the 'span' or 'blocks' "
                "site with probe_blocks >= 1")
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


def format_bytes(n: float) -> str:
    """Human-readable size that stays informative for small caches (never "0.0 MiB")."""
    for unit in ("B", "KiB", "MiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} GiB"


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
        self.guarded_fills = 0
        self.guard_computes = 0
        self._reset_state()

    def _reset_state(self):
        self.policy_state = self.config.policy.new_state()
        self.forecasters: dict = {}
        self.norm_bands: dict = {}  # (key, uuid) -> (min, max) norm of its computed values, 0-dim tensors
        self.prepared: dict = {}  # (key, uuid) -> the checked fill of the current call
        self.guarded_keys: set = set()
        self.shared: dict = {}  # key -> state its forecasters share across conditionings
        self.updated_at: dict = {}  # (key, uuid) -> index of the evaluation that last stored it
        self.cache_bytes = 0
        self.ref_uuid = None
        self.signatures: dict = {}  # uuid -> (chunk shape, dtype, device) of its input
        self.decision: Optional[bool] = None
        self.indicator = None
        self.consecutive_fills = 0
        self.last_reference_compute = -1  # evaluation index of the reference's latest compute
        self.uuids: list = []
        self.seen: set = set()  # uuids called in the current evaluation

    # -- calls and evaluations -------------------------------------------------------------
    def begin_call(self, uuids: list, sigma: float, sample: torch.Tensor) -> None:
        """Start of one model call; detects a new evaluation and shape/dtype/device changes.

        Each conditioning keeps its own caches at its own input shape (regional prompts run at
        their area's size). A new evaluation starts when sigma changes or a conditioning is called
        again; its first call elects the reference if the previous one is absent (a prompt that is
        scheduled over only part of the range), and a new reference restarts the policy.
        """
        if len(set(uuids)) < len(uuids):  # one key per chunk, never one cache for two chunks
            uuids = [(u, uuids[:i].count(u)) for i, u in enumerate(uuids)]
        signature = (tuple(chunk(sample, len(uuids), 0).shape), sample.dtype, sample.device)
        for uuid in uuids:
            previous = self.signatures.get(uuid)
            if previous is not None and previous != signature:
                self._note(f"input changed from {previous} to {signature}: caches reset")
                self._drop_caches(uuid)
                if uuid == self.ref_uuid:
                    self.policy_state = self.config.policy.new_state()
            self.signatures[uuid] = signature
        current = self.trace.evaluations[-1] if self.trace.evaluations else None
        if current is None or sigma != current.sigma or self.seen.intersection(uuids):
            self.trace.begin(sigma, self._step_of(sigma))
            self.decision = None
            self.guarded_keys = set()  # keys whose fills this evaluation fall back to reuse
            self.seen = set()
            if self.ref_uuid not in uuids:
                if self.ref_uuid is not None:
                    self.policy_state = self.config.policy.new_state()
                self.ref_uuid = uuids[0]
        self.seen.update(uuids)
        self.uuids = list(uuids)
        self.prepared = {}

    def _drop_caches(self, uuid) -> None:
        for key in [k for k in self.forecasters if k[1] == uuid]:
            self.cache_bytes -= self.forecasters.pop(key).nbytes
            self.updated_at.pop(key, None)
            self.norm_bands.pop(key, None)

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
                or not (self.active_high >= ev.sigma > self.active_low)
                or (policy.max_consecutive > 0 and self.consecutive_fills >= policy.max_consecutive))

    def decide(self, keys: list, indicator: Callable[[str], Optional[torch.Tensor]]) -> bool:
        """True to compute. `keys` are the cached values a fill would need for every uuid of the call."""
        ev = self.trace.evaluations[-1]
        if self.decision is None and self.ref_uuid in self.uuids:
            kind = self.config.policy.indicator
            self.indicator = None if kind == NO_INDICATOR else indicator(kind)
            forced = self._forced() or not self._has_caches(keys, self.uuids)
            compute, value = self.policy_state.decide(self.indicator, forced)
            if value is not None and not math.isfinite(value):  # e.g. a rate over a vanishing change
                self._note_once(f"the {self.config.policy.method} indicator was not finite: that evaluation was "
                                "computed and the policy restarted")
                self.policy_state = self.config.policy.new_state()
                compute, value = True, None
            self.decision = compute
            ev.indicator = value
            ev.decision = COMPUTED if compute else self.fill_action
            self.consecutive_fills = 0 if compute else self.consecutive_fills + 1
            if compute:
                self.last_reference_compute = ev.index
        compute = self.decision is None or self.decision or not self._has_caches(keys, self.uuids)
        if not compute and not self._prepare_fills(keys):
            self.guard_computes += 1  # no safe fill: this evaluation computes after all
            compute = True
            if self.ref_uuid in self.uuids:
                self.decision = True
                self.consecutive_fills = 0
                self.last_reference_compute = ev.index
        if compute:
            ev.decision = COMPUTED  # the report counts what ran: any call that computes computes the evaluation
        return compute

    def _prepare_fills(self, keys) -> bool:
        """Forecast every value this call fills and check it: a non-finite forecast, or one whose norm leaves
        the band of the computed values' norms, makes its key fill with the last computed value for every
        conditioning of the evaluation (cond and uncond filled alike, so CFG does not amplify a difference).
        False when some value has no safe fill (its last computed value is not finite either)."""
        self.prepared = {(k, u): self.forecasters[(k, u)].predict(self.sigma) for k in keys for u in self.uuids}
        checks = []
        for slot, forecast in self.prepared.items():
            norm = forecast.float().norm()
            low, high = (bound.to(norm.device) for bound in self.norm_bands[slot])  # caches may be offloaded
            checks.append(torch.isfinite(norm) & (norm <= GUARD_BAND * high) & (norm >= low / GUARD_BAND))
        unsafe = {slot[0] for slot, safe in zip(list(self.prepared), torch.stack(checks).tolist()) if not safe}
        self.guarded_keys |= unsafe
        for slot in self.prepared:
            if slot[0] not in self.guarded_keys:
                continue
            latest = self.forecasters[slot].latest()
            if not bool(torch.isfinite(latest).all()):
                self.prepared = {}
                return False
            self.prepared[slot] = latest
            self.guarded_fills += 1
        return True

    def computed(self, output_ref: torch.Tensor) -> None:
        """Feed the policy the reference chunk's output of a computed evaluation."""
        if self.ref_uuid in self.uuids and self.decision:
            self.policy_state.computed(self.indicator, output_ref)

    @property
    def fill_action(self) -> str:
        return REUSED if self.config.forecaster.is_reuse else FORECAST

    def mark(self, row: int, action: str) -> None:
        self.trace.mark(row, action)

    # -- caches --------------------------------------------------------------------------
    def _has_caches(self, keys, uuids) -> bool:
        """Every value a fill needs exists and is no older than the reference's latest compute."""
        return all(self.updated_at.get((k, u), -2) >= self.last_reference_compute for k in keys for u in uuids)

    def store(self, key, values: torch.Tensor, grid: Optional[TokenGrid] = None) -> None:
        """Record a computed value (batched over the call's uuids) at the current sigma.

        `grid` locates the value's image tokens (for frequency-aware forecasters); None if unknown."""
        if self.over_budget:
            return
        n = len(self.uuids)
        for i, uuid in enumerate(self.uuids):
            forecaster = self.forecasters.get((key, uuid))
            if forecaster is None:
                store_device = torch.device("cpu") if self.config.offload_to_cpu else None
                forecaster = self.config.forecaster.new_state(store_device, grid_for(chunk(values, n, i), grid),
                                                              self.shared.setdefault(key, {}))
                self.forecasters[(key, uuid)] = forecaster
            before = forecaster.nbytes
            value = chunk(values, n, i)
            forecaster.update(self.sigma, value)
            self.updated_at[(key, uuid)] = self.trace.evaluations[-1].index
            self.cache_bytes += forecaster.nbytes - before
            norm = value.detach().float().norm()
            low, high = self.norm_bands.get((key, uuid), (norm, norm))
            self.norm_bands[(key, uuid)] = (torch.minimum(low, norm), torch.maximum(high, norm))
        self.peak_bytes = max(self.peak_bytes, self.cache_bytes)
        budget = self.config.memory_budget_mb * 2**20
        if budget and self.cache_bytes > budget:
            self._note(f"cache memory {format_bytes(self.cache_bytes)} exceeded the budget of "
                       f"{format_bytes(budget)}: caching stopped for the rest of this run")
            self.over_budget = True
            self.forecasters.clear()
            self.norm_bands.clear()
            self.shared.clear()
            self.updated_at.clear()
            self.cache_bytes = 0

    def fill(self, key, like: torch.Tensor) -> torch.Tensor:
        """The checked forecast of `key` at the current sigma for every uuid of the call, batched like `like`."""
        parts = [self.prepared.pop((key, u)).to(like.device) for u in self.uuids]
        return torch.cat(parts, dim=0)

    def reference_chunk(self, tensor: torch.Tensor) -> Optional[torch.Tensor]:
        if self.ref_uuid not in self.uuids:
            return None
        return chunk(tensor, len(self.uuids), self.uuids.index(self.ref_uuid))

    def stand_aside(self, reason: str) -> None:
        """A model call ran uncached for another node (its blocks differ from the run's): count it, say why once."""
        if self.trace.evaluations:
            self.trace.evaluations[-1].aside += 1
        self._note_once(reason)

    def _note_once(self, message: str) -> None:
        if message not in self.notes:
            self._note(message)

    # -- report --------------------------------------------------------------------------
    def _note(self, message: str) -> None:
        log.warning("FeatureCache: %s", message)
        self.notes.append(message)

    def report(self) -> dict:
        fraction = self.trace.compute_fraction()
        decisions = [ev.decision for ev in self.trace.evaluations]
        notes = list(self.notes)
        if self.guarded_fills:
            notes.append(f"{self.guarded_fills} forecast fills were not finite or overshot (norm outside "
                         f"[1/{GUARD_BAND:g}, {GUARD_BAND:g}] x the computed values' range): replaced by the last "
                         "computed value")
        if self.guard_computes:
            notes.append(f"{self.guard_computes} calls computed because a cached value was not finite")
        return {
            **self.config.describe(),
            "evaluations": len(decisions),
            "evaluations_computed": sum(d == COMPUTED for d in decisions),
            "evaluations_filled": sum(d != COMPUTED for d in decisions),
            "cells": self.trace.counts(),
            "calls_stood_aside": sum(ev.aside for ev in self.trace.evaluations),
            "compute_fraction": fraction,
            "ideal_speedup": (1.0 / fraction) if fraction > 0 else float("inf"),
            "peak_cache_bytes": self.peak_bytes,
            "guarded_fills": self.guarded_fills,
            "notes": notes,
            "trace": self.trace.to_dict(),
        }

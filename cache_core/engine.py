"""The per-run engine: one CacheRun per sampling run, shared by every model call of that run.

Decisions are taken once per model evaluation from one reference conditioning (the first uuid of
the run), so cond and uncond batched together or run in separate calls take the same decisions.
A per-segment policy takes one decision per cached segment instead, each with its own state: the
same path, keyed by the segment's scope (None for an evaluation-wide decision).
Caches are kept per conditioning uuid and per key (a block segment or the whole model).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .cfg import CfgBranchCache
from .forecasters import ForecasterConfig
from .grid import TokenGrid, grid_for
from .policies import NO_INDICATOR, PROBE_RESIDUAL, PROGRESS, FixedInterval, Policy, Scope
from .sites import Site
from .tokens import TokenConfig
from .trace import COMPUTED, FORECAST, REJECTED, REUSED, Trace

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
    cfg_refresh: int = 0  # CFG-branch cache: both branches computed every cfg_refresh evaluations; 0: off

    def __post_init__(self):
        if self.policy.indicator == PROBE_RESIDUAL and self.site.probe_blocks < 1:
            raise ValueError(
                f"the '{self.policy.method}' policy reads the residual of probe blocks: use the 'span' or 'blocks' "
                "site with probe_blocks >= 1")
        if self.memory_budget_mb < 0:
            raise ValueError("memory_budget_mb must be >= 0 (0 means unlimited)")
        if self.tokens is not None and not self.site.uses_blocks:
            raise ValueError("token-level recompute needs a block site ('span' or 'blocks'), not 'model'")
        policy = self.policy
        if (policy.per_segment or policy.verifies) and not self.site.uses_blocks:
            what = "decides per block" if policy.per_segment else "verifies its drafts on one computed block"
            raise ValueError(f"the '{policy.method}' policy {what}: set the site to 'blocks' (or 'span'), not 'model'")
        if self.cfg_refresh == 1 or self.cfg_refresh < 0:
            raise ValueError(f"cfg_refresh must be 0 (off) or >= 2 (both branches computed every N steps), "
                             f"got {self.cfg_refresh}")

    def describe(self) -> dict:
        return {
            "method": self.policy.method,
            "threshold": self.policy.effective_threshold,
            "forecaster": self.forecaster.label,
            "site": self.site.kind,
            "probe_blocks": self.site.probe_blocks,
            "corrector_blocks": self.site.corrector_blocks,
            "cfg_refresh": self.cfg_refresh,
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
        self.guarded_fills = 0
        self.guard_computes = 0
        self._reset_state()

    def _reset_state(self):
        self.policy_states: dict = {}  # scope -> PolicyState (scope None: the evaluation-wide decision)
        self.forecasters: dict = {}
        self.norm_bands: dict = {}  # (key, uuid) -> (min, max) norm of its computed values, 0-dim tensors
        self.prepared: dict = {}  # (key, uuid) -> the checked fill of the current call
        self.guarded_keys: set = set()
        self.shared: dict = {}  # key -> state its forecasters share across conditionings
        self.cache_bytes = 0
        self.ref_uuid = None
        self.signature = None
        self.decisions: dict = {}  # scope -> compute? in the current evaluation
        self.indicators: dict = {}
        self.consecutive_fills: dict = {}
        self.pending_verification = False  # a fresh draft of the current evaluation awaits `verify`
        self.uuids: list = []
        self.cfg = CfgBranchCache(self.config.cfg_refresh) if self.config.cfg_refresh else None

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
        ref_decided_again = self.ref_uuid in uuids and bool(self.decisions)
        if current is None or sigma != current.sigma or ref_decided_again:
            self.trace.begin(sigma, self._step_of(sigma))
            self.decisions = {}
            self.pending_verification = False
            self.guarded_keys = set()  # keys whose fills this evaluation fall back to reuse
        self.uuids = list(uuids)
        self.prepared = {}

    def prefer_reference(self, uuid) -> None:
        """Take decisions from this conditioning (set before the first call; the CFG-branch cache calls the
        positive branch alone on its filled steps, so the decisions must come from it)."""
        if self.ref_uuid is None:
            self.ref_uuid = uuid

    @property
    def sigma(self) -> float:
        return self.trace.evaluations[-1].sigma

    def _step_of(self, sigma: float) -> int:
        steps = self.schedule[:-1] or [sigma]
        return min(range(len(steps)), key=lambda i: abs(steps[i] - sigma))

    def _forced(self, scope) -> bool:
        ev = self.trace.evaluations[-1]
        policy = self.config.policy
        return (self.over_budget
                or ev.index < policy.warmup_steps
                or not (self.active_high >= ev.sigma > self.active_low)
                or (policy.max_consecutive > 0 and self.consecutive_fills.get(scope, 0) >= policy.max_consecutive))

    def _progress(self) -> torch.Tensor:
        steps = len(self.schedule) - 1
        return torch.tensor(self.trace.evaluations[-1].step / max(1, steps - 1))

    def _state(self, scope: Optional[Scope]):
        if scope not in self.policy_states:
            policy = self.config.policy
            self.policy_states[scope] = policy.new_state() if scope is None else policy.new_state(scope)
        return self.policy_states[scope]

    def decide(self, keys: list, indicator: Callable[[str], Optional[torch.Tensor]],
               scope: Optional[Scope] = None, forced_by: Optional[str] = None) -> bool:
        """True to compute. `keys` are the cached values a fill would need for every uuid of the call.

        `scope` names the segment of a per-segment policy's decision; other policies decide once per
        evaluation and ignore it. `forced_by` names why this call cannot be filled (e.g. ControlNet
        residuals entering skipped blocks); the evaluation is computed and its trace entry says why."""
        policy = self.config.policy
        scope = scope if policy.per_segment else None
        if scope not in self.decisions and self.ref_uuid in self.uuids:
            ev = self.trace.evaluations[-1]
            kind = policy.indicator
            value_in = None if kind == NO_INDICATOR else self._progress() if kind == PROGRESS else indicator(kind)
            forced = bool(forced_by) or self._forced(scope) or not self._has_caches(keys, [self.ref_uuid])
            compute, value = self._state(scope).decide(value_in, forced)
            self.decisions[scope] = compute
            self.indicators[scope] = value_in
            if scope is None or ev.indicator is None:
                ev.indicator = value
            ev.forced_by = ev.forced_by or forced_by
            self._record(scope, compute)
            self.pending_verification = policy.verifies and not compute
        if forced_by:
            return True
        decision = self.decisions.get(scope)
        if decision is None:  # the reference conditioning has not been seen in this evaluation
            return True
        if decision or not self._has_caches(keys, self.uuids):
            return True
        if self._prepare_fills(keys):
            return False
        self.guard_computes += 1
        if self.ref_uuid in self.uuids:  # no safe fill: this decision computes after all
            self.decisions[scope] = True
            self.pending_verification = False
            self._record(scope, True)
        return True

    def _record(self, scope, compute: bool) -> None:
        ev = self.trace.evaluations[-1]
        ev.decision = COMPUTED if all(self.decisions.values()) else self.fill_action
        self.consecutive_fills[scope] = 0 if compute else self.consecutive_fills.get(scope, 0) + 1

    def verify(self, error: float) -> bool:
        """A verifying policy's check of the pending draft: `error` is the verified block's relative output
        error. False rejects the draft: the evaluation is computed instead."""
        self.pending_verification = False
        accepted = self._state(None).accept(error)
        self.trace.evaluations[-1].indicator = error
        if not accepted:
            self.decisions[None] = True
            self._record(None, True)
        return accepted

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
        safe_flags = torch.stack(checks).tolist() if checks else []
        unsafe = {slot[0] for slot, safe in zip(list(self.prepared), safe_flags) if not safe}
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
        if self.ref_uuid in self.uuids and self.decisions.get(None):
            self._state(None).computed(self.indicators[None], output_ref)

    def evaluation_computed(self) -> bool:
        """Whether the latest evaluation ran its cached blocks (all of them) rather than filling them."""
        return bool(self.trace.evaluations) and self.trace.evaluations[-1].decision == COMPUTED

    def cfg_without_negative(self) -> None:
        """The CFG-branch cache saw a step with no negative branch (cfg 1): said once in the report."""
        message = "the CFG-branch cache has nothing to do at cfg 1 (no negative branch is computed)"
        if message not in self.notes:
            self._note(message)

    def cfg_filled(self, share: float) -> None:
        """The current evaluation ran the model for this share of its batch (the CFG-branch cache filled the rest)."""
        self.trace.evaluations[-1].share = share

    @property
    def fill_action(self) -> str:
        return REUSED if self.config.forecaster.is_reuse else FORECAST

    def mark(self, row: int, action: str) -> None:
        self.trace.mark(row, action)

    # -- caches --------------------------------------------------------------------------
    def _has_caches(self, keys, uuids) -> bool:
        return all((k, u) in self.forecasters for k in keys for u in uuids)

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
            self.cache_bytes += forecaster.nbytes - before
            norm = value.detach().float().norm()
            low, high = self.norm_bands.get((key, uuid), (norm, norm))
            self.norm_bands[(key, uuid)] = (torch.minimum(low, norm), torch.maximum(high, norm))
        self.peak_bytes = max(self.peak_bytes, self.cache_bytes)
        budget = self.config.memory_budget_mb * 2**20
        if budget and self.cache_bytes > budget:
            self._note(f"cache memory {self.cache_bytes / 2**20:.1f} MiB exceeded the budget of "
                       f"{self.config.memory_budget_mb} MiB: caching stopped for the rest of this run")
            self.over_budget = True
            self.forecasters.clear()
            self.norm_bands.clear()
            self.shared.clear()
            self.cache_bytes = 0

    def fill(self, key, like: torch.Tensor) -> torch.Tensor:
        """The checked forecast of `key` at the current sigma for every uuid of the call, batched like `like`."""
        parts = [self.prepared.pop((key, u)).to(like.device) for u in self.uuids]
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
            "evaluations_rejected": sum(REJECTED in ev.actions for ev in self.trace.evaluations),
            "evaluations_cfg_filled": sum(ev.share < 1.0 for ev in self.trace.evaluations),
            "cells": self.trace.counts(),
            "compute_fraction": fraction,
            "ideal_speedup": (1.0 / fraction) if fraction > 0 else float("inf"),
            "peak_cache_bytes": self.peak_bytes + (self.cfg.nbytes if self.cfg else 0),
            "guarded_fills": self.guarded_fills,
            "notes": notes,
            "trace": self.trace.to_dict(),
        }

"""The per-run engine: one CacheRun per sampling run, shared by every model call of that run.

Decisions are taken once per model evaluation from one reference conditioning (the first uuid of
the run), so cond and uncond batched together or run in separate calls take the same decisions.
A per-segment policy takes one decision per cached segment instead, each with its own state and
gate: the same path, keyed by the segment's scope (None for an evaluation-wide decision).
Caches are kept per conditioning uuid and per key (a block segment or the whole model).
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .cfg import CfgBranchCache
from .forecasters import ForecasterConfig
from .forecasters.history import Storage, predict_all
from .grid import TokenGrid, grid_for
from .policies import NO_INDICATOR, PROBE_INDICATORS, PROGRESS, FixedInterval, Pending, Policy, Scope
from .sites import Site
from .tokens import TokenConfig, TokenState
from .trace import COMPUTED, FORECAST, PARTIAL, REJECTED, REUSED, Trace

log = logging.getLogger("FeatureCache")
BUDGET_TOLERANCE = 0.05
# A fill's forecast must have a norm within [min / GUARD_BAND, max * GUARD_BAND] of the norms of the
# values computed for it so far; outside (or not finite) it is an overshoot and reuse replaces it.
GUARD_BAND = 2.0


def host_values(scalars: list) -> list:
    """[float(s) for s in scalars] (0-dim tensors) with one synchronisation per device instead of one per scalar;
    None for meta tensors (the memory report's accounting run), which hold no values."""
    values: list = [None] * len(scalars)
    by_device: dict = {}
    for i, scalar in enumerate(scalars):
        if not scalar.is_meta:
            by_device.setdefault(scalar.device, []).append(i)
    for members in by_device.values():
        for i, value in zip(members, torch.stack([scalars[i].float() for i in members]).tolist()):
            values[i] = value
    return values


# Without a memory budget, kept attention keys and values (gigabytes per block at video sizes) take at most
# this share of the memory that was free on their device when the first were kept.
ATTENTION_SHARE_OF_FREE = 0.5


def free_memory_bytes(device: torch.device) -> Optional[int]:
    """Memory free on `device` now (CUDA: the driver's count; CPU: MemAvailable); None when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as meminfo:
                for line in meminfo:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
    return None


CACHE_DTYPES = {"auto": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class CacheConfig:
    policy: Policy = field(default_factory=FixedInterval)
    forecaster: ForecasterConfig = field(default_factory=ForecasterConfig)
    site: Site = field(default_factory=Site)
    tokens: Optional[TokenConfig] = None
    offload_to_cpu: bool = False
    memory_budget_mb: float = 0.0  # 0: unlimited
    cache_dtype: str = "auto"  # values' storage dtype (differences and sums stay float32); auto: the model's
    cfg_refresh: int = 0  # CFG-branch cache: both branches computed every cfg_refresh evaluations; 0: off

    def __post_init__(self):
        if self.policy.indicator in PROBE_INDICATORS and self.site.probe_blocks < 1:
            raise ValueError(
                f"the '{self.policy.method}' policy reads the always-computed probe blocks, which the "
                f"'{self.site.kind}' site with probe_blocks {self.site.probe_blocks} does not have: on Apply Feature "
                "Cache set site to 'span' or 'blocks' with probe_blocks >= 1")
        if self.cache_dtype not in CACHE_DTYPES:
            raise ValueError(f"unknown cache_dtype '{self.cache_dtype}'; available: {', '.join(CACHE_DTYPES)}")
        if self.memory_budget_mb < 0:
            raise ValueError("memory_budget_mb must be >= 0 (0 means unlimited)")
        if self.tokens is not None and not self.site.uses_blocks:
            raise ValueError("token-level recompute (the tokens input) needs a block site: choose site 'span' or "
                             "'blocks', not 'model', or disconnect the tokens input")
        policy = self.policy
        if (policy.per_segment or policy.verifies) and not self.site.uses_blocks:
            what = "decides per block" if policy.per_segment else "verifies its drafts on one computed block"
            raise ValueError(f"the '{policy.method}' policy {what}: set the site to 'blocks' (or 'span'), not 'model'")
        if policy.verifies and self.tokens is not None:
            raise ValueError(f"the '{policy.method}' policy verifies whole drafted steps, which token-level recompute "
                             "would only partly compute: disconnect the tokens input or choose another Cache Policy "
                             "method")
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
            "tokens": None if self.tokens is None else self.tokens.label,
            "cfg_refresh": self.cfg_refresh,
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
        self.attention_room: Optional[float] = None  # bytes kept attention keys and values may take (no budget)
        self.over_budget = False
        self._budget_noted = False
        self.orders_lowered = 0  # by the memory budget, for every forecaster of the run
        self.offloaded = config.offload_to_cpu
        self.offload_pending = False  # asynchronous GPU -> pinned CPU copies not yet waited for
        self.guarded_fills = 0
        self.guard_computes = 0
        self.overhead_s: dict = {}  # evaluation index -> wall seconds spent in our code (not in the model)
        self._model_s = 0.0
        self._reset_state()

    @property
    def fill_cost(self) -> float:
        """Share of the block work a filled evaluation still does (the probe and corrector blocks)."""
        site = self.config.site
        return (site.probe_blocks + site.corrector_blocks) / len(self.trace.rows) if site.uses_blocks else 0.0

    @property
    def compute_cost(self) -> float:
        """Share of the model's work a computed evaluation does: with the CFG-branch cache only every
        cfg_refresh-th compute runs the negative branch (taken as half the batch, as cond and uncond are)."""
        refresh = self.config.cfg_refresh
        return 1.0 if self.cfg is None else (1.0 + (refresh - 1) * 0.5) / refresh

    @property
    def steps(self) -> int:
        return max(1, len(self.schedule) - 1)

    def _reset_state(self):
        self.policy_states: dict = {}  # scope -> PolicyState (scope None: the evaluation-wide decision)
        self.gates: dict = {}  # scope -> its gate (threshold or budget controller), made at its first decision
        self.forecasters: dict = {}
        self.norm_bands: dict = {}  # (key, uuid) -> (min, max) norm of its computed values, 0-dim tensors
        self.prepared: dict = {}  # (key, uuid) -> the checked fill of the current call
        self.guard_masks: dict = {}  # key -> 0-dim bool tensor: its fills of this evaluation fall back to reuse
        # Scalars the engine leaves on the device until the next synchronisation (the next decision's): whether the
        # latest stored value of a (key, uuid) is finite, and how many fills the guard replaced per evaluation
        self.unread_finite: dict = {}
        self.unread_guards: list = []  # [(Evaluation, 0-dim count)]
        self.not_finite: set = set()  # (key, uuid) whose latest stored value is not finite
        self.shared: dict = {}  # key -> state its forecasters share across conditionings
        self.updated_at: dict = {}  # (key, uuid) -> index of the evaluation that last stored it
        self.cache_bytes = 0
        self.ref_uuid = None
        self.signatures: dict = {}  # uuid -> (chunk shape, dtype, device) of its input
        self.decisions: dict = {}  # scope -> compute? in the current evaluation
        self.indicators: dict = {}
        self.consecutive_fills: dict = {}
        self.last_reference_compute: dict = {}  # scope -> evaluation index of the reference's latest compute
        self.pending_verification = False  # a fresh draft of the current evaluation awaits `verify`
        self.uuids: list = []
        self.seen: set = set()  # uuids called in the current evaluation
        self.cfg = CfgBranchCache(self.config.cfg_refresh) if self.config.cfg_refresh else None
        self.tokens = TokenState(self.config.tokens) if self.config.tokens is not None else None

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
                    self.policy_states = {}
            self.signatures[uuid] = signature
        current = self.trace.evaluations[-1] if self.trace.evaluations else None
        if current is None or sigma != current.sigma or self.seen.intersection(uuids):
            self.trace.begin(sigma, self._step_of(sigma))
            self.decisions = {}
            self.pending_verification = False
            self.guard_masks = {}
            self.seen = set()
            if self.ref_uuid not in uuids:
                if self.ref_uuid is not None:
                    self.policy_states = {}
                self.ref_uuid = uuids[0]
        self.seen.update(uuids)
        self.uuids = list(uuids)
        self.prepared = {}

    def prefer_reference(self, uuid) -> None:
        """Take decisions from this conditioning (set before the first call; the CFG-branch cache calls the
        positive branch alone on its filled steps, so the decisions must come from it)."""
        if self.ref_uuid is None:
            self.ref_uuid = uuid

    def _drop_caches(self, uuid) -> None:
        for key in [k for k in self.forecasters if k[1] == uuid]:
            self.cache_bytes -= self.forecasters.pop(key).nbytes
            self.updated_at.pop(key, None)
            self.norm_bands.pop(key, None)
            self.unread_finite.pop(key, None)
            self.not_finite.discard(key)
        if self.tokens is not None:
            self.tokens.drop_keys_values(uuid)

    @property
    def sigma(self) -> float:
        return self.trace.evaluations[-1].sigma

    def _step_of(self, sigma: float) -> int:
        steps = self.schedule[:-1] or [sigma]
        return min(range(len(steps)), key=lambda i: abs(steps[i] - sigma))

    def _forced(self, scope) -> bool:
        ev = self.trace.evaluations[-1]
        policy = self.config.policy
        share = self._gate(scope).compute_share
        return (self.over_budget
                or ev.index < policy.warmup_steps
                or ev.step < int(policy.effective_retention(share) * self.steps)
                or not (self.active_high >= ev.sigma > self.active_low)
                or 0 < policy.effective_max_consecutive(share) <= self.consecutive_fills.get(scope, 0))

    def _progress(self) -> float:
        return self.trace.evaluations[-1].step / max(1, self.steps - 1)

    def _state(self, scope: Optional[Scope]):
        if scope not in self.policy_states:
            policy = self.config.policy
            self.policy_states[scope] = policy.new_state(scope) if policy.per_segment else policy.new_state()
        return self.policy_states[scope]

    @property
    def policy_state(self):
        """The evaluation-wide policy state (per-segment policies keep one per segment)."""
        return self._state(None)

    @property
    def gate(self):
        """The evaluation-wide gate (the budget the run was given)."""
        return self._gate(None)

    def _gate(self, scope: Optional[Scope]):
        if scope not in self.gates:
            self.gates[scope] = self.config.policy.new_gate(self.steps, self.fill_cost, tuple(self.schedule),
                                                            self.compute_cost)
        return self.gates[scope]

    def decide(self, keys: list, indicator: Callable[[str], Optional[torch.Tensor]],
               scope: Optional[Scope] = None, forced_by: Optional[str] = None) -> bool:
        """True to compute. `keys` are the cached values a fill would need for every uuid of the call.

        `scope` names the segment of a per-segment policy's decision; other policies decide once per
        evaluation and ignore it. `forced_by` names why this call cannot be filled (e.g. ControlNet
        residuals entering skipped blocks); the evaluation is computed and its trace entry says why."""
        policy = self.config.policy
        scope = scope if policy.per_segment else None
        ev = self.trace.evaluations[-1]
        if scope not in self.decisions and self.ref_uuid in self.uuids:
            kind = policy.indicator
            value_in = None if kind == NO_INDICATOR else self._progress() if kind == PROGRESS else indicator(kind)
            forced = bool(forced_by) or self._forced(scope) or not self._has_caches(keys, self.uuids, scope)
            state, gate = self._state(scope), self._gate(scope)
            value = state.measure(ev.sigma, value_in)
            if isinstance(value, Pending):  # the evaluation's one synchronisation, with the engine's own scalars
                value = value.finish(self.read_device(value.scalars))
            if value is not None and not math.isfinite(value):  # e.g. a rate over a vanishing change
                self.note_once(f"the {policy.method} indicator was not finite: that evaluation was "
                                "computed and the policy restarted")
                self.policy_states.pop(scope)
                state, value = self._state(scope), None
            gate.count()
            compute = forced or value is None or gate.wants_compute(value, ev.step)
            gate.record(value, compute)
            state.decided(compute)
            self.decisions[scope] = compute
            self.indicators[scope] = value_in
            if scope is None or ev.indicator is None:
                ev.indicator = value
            ev.forced_by = ev.forced_by or forced_by
            self._record(scope, compute)
            self.pending_verification = policy.verifies and not compute
        decision = self.decisions.get(scope)
        compute = (bool(forced_by) or decision is None or decision
                   or not self._has_caches(keys, self.uuids, scope))
        if not compute and not self._prepare_fills(keys):
            self.guard_computes += 1  # no safe fill: this decision computes after all
            compute = True
            if self.ref_uuid in self.uuids:
                self._overrule(scope)
        if compute and scope is None:
            ev.decision = COMPUTED  # the report counts what ran: any call that computes computes the evaluation
        return compute

    def _record(self, scope, compute: bool) -> None:
        ev = self.trace.evaluations[-1]
        ev.decision = COMPUTED if all(self.decisions.values()) else self.fill_action
        self.consecutive_fills[scope] = 0 if compute else self.consecutive_fills.get(scope, 0) + 1
        if compute:
            self.last_reference_compute[scope] = ev.index

    def _overrule(self, scope) -> None:
        """A fill decision that turned into a compute (no safe fill, a rejected draft)."""
        self._gate(scope).overruled()
        self._state(scope).decided(True)
        self.decisions[scope] = True
        self.pending_verification = False
        self._record(scope, True)

    def verify(self, error: float) -> bool:
        """A verifying policy's check of the pending draft: `error` is the verified block's relative output
        error. False rejects the draft: the evaluation is computed instead."""
        self.pending_verification = False
        accepted = self._state(None).accept(error)
        self.trace.evaluations[-1].indicator = error
        if not accepted:
            self._overrule(None)
        return accepted

    def read_device(self, scalars: list = ()) -> list:
        """The host values of `scalars` and of every scalar the engine left on the device (finiteness of stored
        values, guard counts), in one synchronisation; the guard counts go to the trace and the report."""
        finite, guards = list(self.unread_finite.items()), self.unread_guards
        self.unread_finite, self.unread_guards = {}, []
        values = host_values(list(scalars) + [f for _, f in finite] + [g for _, g in guards])
        for (slot, _), ok in zip(finite, values[len(scalars):]):
            (self.not_finite.add if ok == 0.0 else self.not_finite.discard)(slot)
        for (ev, _), count in zip(guards, values[len(scalars) + len(finite):]):
            ev.guarded += int(count or 0)
            self.guarded_fills += int(count or 0)
        return values[:len(scalars)]

    def _prepare_fills(self, keys) -> bool:
        """Forecast every value this call fills and guard it. False when some value has no safe fill (its last
        computed value is not finite: the engine knows that from the scalars it read in this evaluation's
        decision, or reads them now when the decision needed none)."""
        self._wait_for_offload()
        keys = list(dict.fromkeys(keys))  # the guard views its checks as keys x uuids
        slots = [(k, u) for k in keys for u in self.uuids]
        if not slots:  # a scope with nothing to fill (per-segment decisions)
            self.prepared = {}
            return True
        if any(slot in self.unread_finite for slot in slots):
            self.read_device()
        if any(slot in self.not_finite for slot in slots):
            self.prepared = {}
            return False
        timing = self.policy_states.get(None)  # DiCache remaps the fill time; per-segment policies do not
        times = [timing.fill_time(u, self.sigma) if timing else self.sigma for _, u in slots]
        self.prepared = dict(zip(slots, predict_all([self.forecasters[slot] for slot in slots], times)))
        if not self.config.forecaster.is_reuse:  # a reuse fill is the last computed value: nothing to guard
            self._guard(keys)
        return True

    def _guard(self, keys: list) -> None:
        """A non-finite forecast, or one whose norm leaves the band of the computed values' norms, is replaced by
        the last computed value, for every conditioning of the evaluation (cond and uncond filled alike, so CFG
        does not amplify a difference). Branch-free on the device (no synchronisation): the count of replaced
        fills reaches the evaluation's trace entry with the next synchronisation (`read_device`)."""
        slots = list(self.prepared)
        norms = torch.stack([n.float() for n in torch._foreach_norm(list(self.prepared.values()), 2)])
        bands = torch.stack([torch.stack(self.norm_bands[slot]).float() for slot in slots]).to(norms.device)
        safe = torch.isfinite(norms) & (norms <= GUARD_BAND * bands[:, 1]) & (norms >= bands[:, 0] / GUARD_BAND)
        unsafe = ~safe.view(len(keys), len(self.uuids)).all(dim=1)
        replaced = []
        for i, key in enumerate(keys):
            mask = unsafe[i] if key not in self.guard_masks else unsafe[i] | self.guard_masks[key]
            self.guard_masks[key] = mask
            replaced.append(mask)
            for uuid in self.uuids:
                forecast = self.prepared[(key, uuid)]
                torch.where(mask, self.forecasters[(key, uuid)].latest(copy=False).to(forecast.device), forecast,
                            out=forecast)
        self.unread_guards.append((self.trace.evaluations[-1], torch.stack(replaced).sum() * len(self.uuids)))

    def token_selection(self, compute: bool, features: torch.Tensor) -> Optional[torch.Tensor]:
        """Token indices this call's cached segments recompute on a partial evaluation (None: compute or fill
        whole). `features` [B, N, C]: the image tokens at the first cached block."""
        if self.tokens is None:
            return None
        ev = self.trace.evaluations[-1]
        partial = not compute and self.tokens.partial_step(self.consecutive_fills.get(None, 0))
        if partial and self.ref_uuid in self.uuids:
            ev.decision = PARTIAL
        reference = self.uuids.index(self.ref_uuid) if self.ref_uuid in self.uuids else -1
        index = self.tokens.select(features, self.uuids, ev.index, compute, partial, reference)
        while self.tokens.notes:
            self._note(self.tokens.notes.pop(0))
        self.account_tokens()
        return index

    def keep_keys_values(self, block, k: torch.Tensor, v: torch.Tensor) -> None:
        """A cached block's self-attention keys and values of every position (for partial evaluations), kept
        only within the memory budget that the other caches leave, or without a budget within a share of the
        memory free on their device (a block without them attends to the subset)."""
        if self.over_budget:
            return
        device = torch.device("cpu") if self.offloaded else k.device
        budget = self.config.memory_budget_mb * 2**20
        growth = self.tokens.growth_of_keys_values(block, self.uuids, k, v)
        if budget and self.cache_bytes + self.tokens.nbytes + growth > budget:
            self.tokens.drop_keys_values(block=block)
            self.note_once(f"the memory budget of {format_bytes(budget)} leaves no room for the attention keys and "
                           "values of some cached blocks: their recomputed tokens attend only to each other and the "
                           "text (raise memory_budget_mb or set cache_device to cpu)")
            return
        if not budget:
            if self.attention_room is None:
                free = free_memory_bytes(device)
                self.attention_room = math.inf if free is None else ATTENTION_SHARE_OF_FREE * free
            if self.tokens.keys_values_bytes + growth > self.attention_room:
                self.tokens.drop_keys_values(block=block)
                self.note_once(f"the attention keys and values of some cached blocks would take more than "
                               f"{ATTENTION_SHARE_OF_FREE:.0%} of the {device.type} memory free at the start "
                               f"({format_bytes(self.attention_room)}): those blocks' recomputed tokens attend only "
                               "to each other and the text (set memory_budget_mb to choose, or cache_device to cpu)")
                return
        self.tokens.keep_keys_values(block, self.uuids, k, v, device if self.offloaded else None)
        self.account_tokens()

    def account_tokens(self) -> None:
        """Token memory (per-token inputs, fill corrections) counts towards the peak cache bytes."""
        self.peak_bytes = max(self.peak_bytes, self.cache_bytes + self.tokens.nbytes)

    def computed(self, output_ref: torch.Tensor, residual_ref: torch.Tensor) -> None:
        """Feed the policy the reference chunk's output and residual of a computed evaluation."""
        if self.ref_uuid in self.uuids and self.decisions.get(None):
            self._state(None).computed(self.sigma, self.indicators[None], output_ref, residual_ref)

    def observe_probe(self, residual: torch.Tensor) -> None:
        """The probe blocks' residual of every conditioning of the call, before the decision (fills read it)."""
        for i, uuid in enumerate(self.uuids):
            self._state(None).observe_probe(uuid, chunk(residual, len(self.uuids), i))

    def probe_computed(self) -> None:
        """The call computes: its observed probe residuals belong to computed points."""
        for uuid in self.uuids:
            self._state(None).probe_computed(uuid, self.sigma)

    def evaluation_computed(self) -> bool:
        """Whether the latest evaluation ran its cached blocks (all of them) rather than filling them."""
        return bool(self.trace.evaluations) and self.trace.evaluations[-1].decision == COMPUTED

    def cfg_without_negative(self) -> None:
        """The CFG-branch cache saw a step with no negative branch (cfg 1): said once in the report. Before the
        run's first decision it is turned off for the run, so the budget counts every compute whole."""
        if not self.gates:
            self.cfg = None
        message = "the CFG-branch cache has nothing to do at cfg 1 (no negative branch is computed)"
        if message not in self.notes:
            self._note(message)

    def ran_for(self, share: float) -> None:
        """The current evaluation ran the model for this share of its batch (the CFG-branch cache filled the rest)."""
        self.trace.evaluations[-1].share = share

    @property
    def fill_action(self) -> str:
        return REUSED if self.config.forecaster.is_reuse else FORECAST

    def mark(self, row: int, action: str, fraction: Optional[float] = None) -> None:
        self.trace.mark(row, action, fraction)

    # -- caches --------------------------------------------------------------------------
    def _has_caches(self, keys, uuids, scope=None) -> bool:
        """Every value a fill needs exists and is no older than the reference's latest compute (of its segment,
        for a per-segment decision)."""
        latest = self.last_reference_compute.get(scope, -1)
        return all(self.updated_at.get((k, u), -2) >= latest for k in keys for u in uuids)

    def store(self, key, values: torch.Tensor, grid: Optional[TokenGrid] = None) -> None:
        """Record a computed value (batched over the call's uuids) at the current sigma.

        `grid` locates the value's image tokens (for frequency-aware forecasters); None if unknown."""
        if self.over_budget:
            return
        n = len(self.uuids)
        storage = Storage(torch.device("cpu") if self.offloaded else None, CACHE_DTYPES[self.config.cache_dtype])
        self.offload_pending |= storage.offloads and values.is_cuda
        for i, uuid in enumerate(self.uuids):
            forecaster = self.forecasters.get((key, uuid))
            if forecaster is None:
                forecaster = self.config.forecaster.new_state(storage, grid_for(chunk(values, n, i), grid),
                                                              self.shared.setdefault(key, {}))
                for _ in range(self.orders_lowered):
                    forecaster.lower_order()
                self.forecasters[(key, uuid)] = forecaster
            before = forecaster.nbytes
            value = chunk(values, n, i)
            forecaster.update(self.sigma, value)
            self.updated_at[(key, uuid)] = self.trace.evaluations[-1].index
            self.cache_bytes += forecaster.nbytes - before
            norm = torch.linalg.vector_norm(value.detach(), dtype=torch.float32)
            low, high = self.norm_bands.get((key, uuid), (norm, norm))
            self.norm_bands[(key, uuid)] = (torch.minimum(low, norm), torch.maximum(high, norm))
            self.unread_finite[(key, uuid)] = self._finite_as_stored(value, norm, storage.dtype)
        self.peak_bytes = max(self.peak_bytes, self.cache_bytes)
        budget = self.config.memory_budget_mb * 2**20
        if budget and self.cache_bytes > budget:
            self._meet_budget(budget, values.is_cuda)

    @staticmethod
    def _finite_as_stored(value: torch.Tensor, norm: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
        """Whether `value` is finite as the cache keeps it, a 0-dim bool tensor (read later, with other scalars).
        A norm that overflows float32 counts as not finite (the cache then computes rather than fills)."""
        finite = torch.isfinite(norm)
        if dtype is not None and dtype.is_floating_point and torch.finfo(dtype).max < torch.finfo(value.dtype).max:
            low, high = torch.aminmax(value.detach())
            finite = finite & (high <= torch.finfo(dtype).max) & (low >= -torch.finfo(dtype).max)
        return finite

    def _meet_budget(self, budget: float, on_gpu: bool) -> None:
        """Over the memory budget: lower the forecaster order, then offload to CPU memory (from a GPU), then stop."""
        used = self.cache_bytes
        while self.cache_bytes > budget and any([f.lower_order() for f in self.forecasters.values()]):
            self.orders_lowered += 1
            self.cache_bytes = sum(f.nbytes for f in self.forecasters.values())
        if self.cache_bytes <= budget:
            self._note(f"cache memory {format_bytes(used)} exceeded the budget of {format_bytes(budget)}: forecaster "
                       f"order lowered by {self.orders_lowered} ({format_bytes(self.cache_bytes)})")
            return
        if on_gpu and not self.offloaded:
            self._note(f"cache memory {format_bytes(used)} exceeded the budget of {format_bytes(budget)} on the GPU: "
                       "caches moved to CPU memory (they restart at the next computed evaluation)")
            self.offloaded = True
        else:
            self._note(f"cache memory {format_bytes(used)} exceeded the budget of {format_bytes(budget)}: "
                       "caching stopped for the rest of this run")
            self.over_budget = True
        self.forecasters.clear()
        self.norm_bands.clear()
        self.unread_finite.clear()
        self.not_finite.clear()
        self.shared.clear()
        self.updated_at.clear()
        self.cache_bytes = 0
        if self.tokens is not None:
            self.tokens.drop_keys_values()

    def _wait_for_offload(self) -> None:
        """One wait for this evaluation's asynchronous copies to pinned memory, before the CPU reads them."""
        if self.offload_pending:
            torch.cuda.synchronize()
            self.offload_pending = False

    def fill(self, key, like: torch.Tensor) -> torch.Tensor:
        """The checked forecast of `key` at the current sigma for every uuid of the call, batched like `like`: a fresh
        tensor (forecasts are), which the caller may update in place."""
        parts = [self.prepared.pop((key, u)).to(like.device) for u in self.uuids]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    def reference_chunk(self, tensor: torch.Tensor) -> Optional[torch.Tensor]:
        if self.ref_uuid not in self.uuids:
            return None
        return chunk(tensor, len(self.uuids), self.uuids.index(self.ref_uuid))

    def stand_aside(self, reason: str) -> None:
        """A model call ran uncached for another node (its blocks differ from the run's): count it, say why once."""
        if self.trace.evaluations:
            self.trace.evaluations[-1].aside += 1
        self.note_once(reason)

    def note_once(self, message: str) -> None:
        if message not in self.notes:
            self._note(message)

    # -- overhead ------------------------------------------------------------------------
    @contextlib.contextmanager
    def timed(self):
        """Around an entry point of our code in a model call: its wall time, less `model_call`s, is overhead."""
        started, self._model_s = time.perf_counter(), 0.0
        try:
            yield
        finally:
            if self.trace.evaluations:
                index = self.trace.evaluations[-1].index
                self.overhead_s[index] = self.overhead_s.get(index, 0.0) + time.perf_counter() - started - self._model_s

    def model_call(self, function: Callable, *args, **kwargs):
        """Run the model's own work (a block, the whole model) inside `timed`, excluded from the overhead."""
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            self._model_s += time.perf_counter() - started

    def _overhead_ms(self, filled: bool) -> Optional[float]:
        chosen = [self.overhead_s.get(ev.index, 0.0) for ev in self.trace.evaluations
                  if (ev.decision != COMPUTED) == filled]
        return 1000.0 * sum(chosen) / len(chosen) if chosen else None

    # -- report --------------------------------------------------------------------------
    def _note(self, message: str) -> None:
        log.warning("FeatureCache: %s", message)
        self.notes.append(message)

    def report(self) -> dict:
        self.read_device()  # the guard counts still on the device
        fraction = self.trace.compute_fraction()
        budget = self.gate.budget
        feature_fraction = self.trace.compute_fraction(with_shares=False)  # the budget is the feature cache's
        if budget is not None and abs(feature_fraction - budget) > BUDGET_TOLERANCE and not self._budget_noted:
            self._budget_noted = True
            self._note(f"compute fraction {feature_fraction:.3f} missed the budget {budget:.3f}: forced computes "
                       "(warmup, retention, start/end, max consecutive, policy needing data) or the always-computed "
                       "probe/corrector blocks set a floor above it, or the run's evaluations differed from the schedule's")
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
            "evaluations_partial": sum(d == PARTIAL for d in decisions),
            "evaluations_rejected": sum(REJECTED in ev.actions for ev in self.trace.evaluations),
            "evaluations_partial_batch": sum(ev.share < 1.0 for ev in self.trace.evaluations),
            "cells": self.trace.counts(),
            "calls_stood_aside": sum(ev.aside for ev in self.trace.evaluations),
            "budget": self.gate.budget,
            "compute_fraction": fraction,
            "ideal_speedup": (1.0 / fraction) if fraction > 0 else float("inf"),
            "peak_cache_bytes": self.peak_bytes + (self.cfg.nbytes if self.cfg else 0),
            "attention_cache_bytes": self.tokens.keys_values_bytes if self.tokens is not None else 0,
            "cache_dtype": self.config.cache_dtype,
            "orders_lowered": self.orders_lowered,
            "offloaded": self.offloaded,
            "guarded_fills": self.guarded_fills,
            "overhead_ms_per_cached_step": self._overhead_ms(filled=True),
            "overhead_ms_per_computed_step": self._overhead_ms(filled=False),
            "notes": notes,
            "trace": self.trace.to_dict(),
        }

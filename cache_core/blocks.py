"""Block sites: drive one model call through its blocks, computing or filling cached segments.

Architecture-neutral: a block is called with an `args` dict whose hidden-state entries are named by
`streams` (e.g. Flux double blocks ("img", "txt"), Wan blocks ("img",)), and `run_block(args)`
returns a dict with the same stream entries. A filled segment returns input + forecast residual at
its first block and passes its input through the rest, so skipped blocks cost nothing.

Models may add to a stream between blocks (ControlNet residuals, VACE hints). Those additions are not
part of a segment's cached residual: within a computed segment, what arrived at a block beyond the
previous block's output is added to the segment's base, so on a filled step the host adds the current
additions on top of the filled value and block skipping stays correct.
A block that ends a stream (SD3's last block returns no text) passes that stream through.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .engine import CacheRun
from .grid import TokenGrid
from .policies import INPUT, MODULATED_INPUT, PROBE_INDICATORS, PROBE_OUTPUT, PROBE_RESIDUAL
from .sites import CORRECTOR, PROBE, BlockPlan
from .trace import COMPUTED

ModulatedInput = Callable[[str, int, dict], Optional[torch.Tensor]]
TokenGridOf = Callable[[str, str], Optional[TokenGrid]]  # (block kind, stream) -> its image-token grid

# Blocks may update their input in place (Flux does), so anything read after a block ran is a copy.


class _Call:
    """What one model call has seen so far (blocks run sequentially within a call)."""

    def __init__(self):
        self.compute = True
        self.modulated: Optional[torch.Tensor] = None
        self.decision_input: Optional[torch.Tensor] = None
        self.probe_kind: Optional[str] = None
        self.probe_base: Optional[torch.Tensor] = None
        self.probe_out: Optional[torch.Tensor] = None
        self.segment_inputs: dict = {}  # per stream: the segment's input plus what was added between its blocks
        self.last_out: dict = {}  # per stream: a copy of the previous block's output within the segment


class BlockRunner:
    def __init__(self, run: CacheRun, plan: BlockPlan, streams: dict, modulated_input: Optional[ModulatedInput] = None,
                 token_grid: Optional[TokenGridOf] = None):
        self.run = run
        self.plan = plan
        self.streams = streams
        self.modulated_input = modulated_input
        self.token_grid = token_grid
        self.segment_keys = [(seg.key, s) for seg in plan.segments for s in streams[seg.kind]]
        self.call = _Call()

    def __call__(self, kind: str, index: int, args: dict, run_block: Callable[[dict], dict],
                 uuids: list, sigma: float) -> dict:
        role, g, segment_number = self.plan.role(kind, index)
        streams = self.streams[kind]
        if g == 0:
            self.run.begin_call(uuids, sigma, args[streams[0]])
            self.call = _Call()
            if self.run.config.policy.indicator == MODULATED_INPUT:
                self.call.modulated = self._modulated(kind, index, args, streams)
        if role == PROBE:
            return self._probe(kind, g, args, run_block, streams)
        if role == CORRECTOR:
            self.run.mark(g, COMPUTED)
            return run_block(args)
        return self._cached(kind, index, g, segment_number, args, run_block, streams)

    def _modulated(self, kind, index, args, streams):
        value = self.modulated_input(kind, index, args) if self.modulated_input else None
        return value if value is not None else args[streams[0]]  # no modulation known: the raw input

    def _probe(self, kind, g, args, run_block, streams):
        if self.call.probe_kind != kind and self.run.config.policy.indicator in PROBE_INDICATORS:
            self.call.probe_kind, self.call.probe_base = kind, args[streams[0]].clone()
        out = run_block(args)
        self.call.probe_out = out[streams[0]]
        self.run.mark(g, COMPUTED)
        return out

    def _indicator(self, kind_of_indicator: str) -> Optional[torch.Tensor]:
        if kind_of_indicator == PROBE_RESIDUAL:
            source = self._probe_residual()
        elif kind_of_indicator == PROBE_OUTPUT:
            source = self.call.probe_out
        else:
            source = {MODULATED_INPUT: self.call.modulated, INPUT: self.call.decision_input}[kind_of_indicator]
        reference = None if source is None else self.run.reference_chunk(source)
        return None if reference is None else reference.clone()

    def _probe_residual(self) -> Optional[torch.Tensor]:
        return None if self.call.probe_out is None else self.call.probe_out - self.call.probe_base

    def _cached(self, kind, index, g, segment_number, args, run_block, streams):
        segment = self.plan.segments[segment_number]
        if g == self.plan.decision_block:
            self.call.decision_input = args[streams[0]]
            probed = self.run.config.policy.indicator in PROBE_INDICATORS and self.call.probe_out is not None
            if probed:
                self.run.observe_probe(self._probe_residual())
            self.call.compute = self.run.decide(self.segment_keys, self._indicator)
            self.call.decision_input = None
            if probed and self.call.compute:
                self.run.probe_computed()
        if not self.call.compute:
            self.run.mark(g, self.run.fill_action)
            if index != segment.first:
                return {s: args[s] for s in streams}
            return {s: args[s] + self.run.fill((segment.key, s), args[s]) for s in streams}
        if index == segment.first:
            self.call.segment_inputs = {s: args[s].clone() for s in streams}
        else:
            for s in streams:
                self.call.segment_inputs[s] += args[s] - self.call.last_out[s]
        out = run_block(args)
        out = {**out, **{s: args[s] for s in streams if out.get(s) is None}}
        self.run.mark(g, COMPUTED)
        if index != segment.last:
            self.call.last_out = {s: out[s].clone() for s in streams}
        else:
            residuals = {s: out[s] - self.call.segment_inputs[s] for s in streams}
            for s in streams:
                grid = self.token_grid(kind, s) if self.token_grid else None
                self.run.store((segment.key, s), residuals[s], grid)
            if segment_number == 0:
                reference = self.run.reference_chunk(out[streams[0]])
                if reference is not None:
                    self.run.computed(reference, self.run.reference_chunk(residuals[streams[0]]))
        return out

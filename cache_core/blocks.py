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
With token-level recompute, a partial segment also runs each of its blocks on a subset of the tokens
(see tokens.py); `token_layouts` (per kind) says where the tokens are, and `with_attention` how a block
call's attention is hooked (to keep and attend to cached keys and values).
A per-segment policy decides at each segment's first block; a verifying policy (SpeCa) runs the
first cached block of a drafted evaluation for real and checks its draft before the rest is filled.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .engine import CacheRun
from .grid import TokenGrid
from .policies import (INPUT, MODULATED_INPUT, PROBE_INDICATORS, PROBE_OUTPUT, PROBE_RESIDUAL, Scope, kept_rows,
                       relative_l1)
from .sites import CORRECTOR, PROBE, BlockPlan
from .tokens import SelfAttention, gather, positions_of
from .trace import COMPUTED, PARTIAL, REJECTED

ModulatedInput = Callable[[str, int, dict], Optional[torch.Tensor]]
TokenGridOf = Callable[[str, str], Optional[TokenGrid]]  # (block kind, stream) -> its image-token grid
# (block args, hook) -> the args of a block call whose attention calls go through the hook (tokens.SelfAttention)
WithAttention = Callable[[dict, Callable], dict]

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
        self.text_lengths: dict = {}  # text token counts seen in this call, by args entry
        self.selection: Optional[torch.Tensor] = None  # tokens a partial call recomputes
        self.partial: Optional[_PartialSegment] = None


class _PartialSegment:
    """A partial segment in progress: the filled token residual, the subset's input rows and hidden states."""

    def __init__(self, fill: torch.Tensor, inputs: torch.Tensor, text_rows: Optional[torch.Tensor]):
        self.fill = fill
        self.inputs = inputs
        self.text_rows = text_rows  # the text rows that run (None: every one)
        self.state: Optional[dict] = None


class BlockRunner:
    def __init__(self, run: CacheRun, plan: BlockPlan, streams: dict, modulated_input: Optional[ModulatedInput] = None,
                 token_grid: Optional[TokenGridOf] = None, token_layouts: Optional[dict] = None,
                 with_attention: Optional[WithAttention] = None):
        self.run = run
        self.plan = plan
        self.streams = streams
        self.modulated_input = modulated_input
        self.token_grid = token_grid
        self.token_layouts = token_layouts or {}
        self.with_attention = with_attention
        self.keys = [[(seg.key, s) for s in streams[seg.kind]] for seg in plan.segments]
        self.scopes = [Scope(seg.key, n, len(plan.segments)) for n, seg in enumerate(plan.segments)]
        first = plan.segments[0]
        # The verified block's own residual: the first segment's when that is one block, else a key of its own.
        own_key = first.key if first.first == first.last else f"{first.key} first block"
        self.verify_keys = [(own_key, s) for s in streams[first.kind]]
        self.segment_keys = [k for keys in self.keys for k in keys]
        if run.config.policy.verifies:
            self.segment_keys += [k for k in self.verify_keys if k not in self.segment_keys]
        self.call = _Call()

    def __call__(self, kind: str, index: int, args: dict, run_block: Callable[[dict], dict],
                 uuids: list, sigma: float) -> dict:
        with self.run.timed():
            return self._block(kind, index, args, lambda a: self.run.model_call(run_block, a), uuids, sigma)

    def _block(self, kind, index, args, run_block, uuids, sigma):
        role, g, segment_number = self.plan.role(kind, index)
        streams = self.streams[kind]
        if g == 0:
            self.run.begin_call(uuids, sigma, args[streams[0]])
            self.call = _Call()
            if self.run.config.policy.indicator == MODULATED_INPUT:
                self.call.modulated = self._modulated(kind, index, args, streams)
        if self.run.tokens is not None:
            self._text_length(kind, args)  # Flux single blocks learn the text length from the double blocks
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
        return None if reference is None else kept_rows(reference)  # the rows policies read, before blocks run in place

    def _probe_residual(self) -> Optional[torch.Tensor]:
        return None if self.call.probe_out is None else self.call.probe_out - self.call.probe_base

    def _cached(self, kind, index, g, segment_number, args, run_block, streams):
        segment = self.plan.segments[segment_number]
        policy = self.run.config.policy
        first_decision = g == self.plan.decision_block
        if first_decision or (policy.per_segment and index == segment.first):
            self.call.decision_input = args[streams[0]]
            probed = first_decision and policy.indicator in PROBE_INDICATORS and self.call.probe_out is not None
            if probed:
                self.run.observe_probe(self._probe_residual())
            keys, scope = ((self.keys[segment_number], self.scopes[segment_number]) if policy.per_segment
                           else (self.segment_keys, None))
            self.call.compute = self.run.decide(keys, self._indicator, scope)
            self.call.decision_input = None
            if probed and self.call.compute:
                self.run.probe_computed()
            if first_decision and self.run.tokens is not None:
                self.call.selection = self.run.token_selection(self.call.compute, self._tokens(kind, args))
            if not self.call.compute and policy.verifies:
                return self._verified(kind, segment, segment_number, index, g, args, run_block, streams)
        if not self.call.compute and self.call.selection is not None:
            return self._partial(kind, index, g, segment, args, run_block, streams)
        if not self.call.compute:
            self.run.mark(g, self.run.fill_action)
            return self._filled(segment, index, args, streams)
        if index == segment.first:
            self.call.segment_inputs = {s: args[s].clone() for s in streams}
        else:
            for s in streams:
                self.call.segment_inputs[s] += args[s] - self.call.last_out[s]
        if self._attends_cached(kind):  # keep the block's self-attention keys and values for partial evaluations
            args = self.with_attention(args, SelfAttention(self.token_layouts[kind].attention,
                                                           self._keeper(kind, index)))
        out = self._run(run_block, args, streams)
        self.run.mark(g, COMPUTED)
        return self._stored(kind, segment, segment_number, index, g, out, streams)

    @staticmethod
    def _run(run_block, args, streams):
        out = run_block(args)
        return {**out, **{s: args[s] for s in streams if out.get(s) is None}}  # a block that ends a stream

    def _filled(self, segment, index, args, streams):
        if index != segment.first:
            return {s: args[s] for s in streams}
        return {s: self.run.fill((segment.key, s), args[s]).add_(args[s]) for s in streams}  # fills are fresh

    def _stored(self, kind, segment, segment_number, index, g, out, streams):
        """Cache what a computed block completes: the verified block's own residual, its segment's residual."""
        grids = {s: self.token_grid(kind, s) if self.token_grid else None for s in streams}
        if g == self.plan.decision_block and self.run.config.policy.verifies and index != segment.last:
            for key, s in self.verify_keys:
                self.run.store((key, s), out[s] - self.call.segment_inputs[s], grids[s])
        if index != segment.last:
            self.call.last_out = {s: out[s].clone() for s in streams}
        else:
            residuals = {s: out[s] - self.call.segment_inputs[s] for s in streams}
            for s in streams:
                self.run.store((segment.key, s), residuals[s], grids[s])
            if segment_number == 0:
                reference = self.run.reference_chunk(out[streams[0]])
                if reference is not None:
                    self.run.computed(reference, self.run.reference_chunk(residuals[streams[0]]))
        return out

    def _verified(self, kind, segment, segment_number, index, g, args, run_block, streams):
        """SpeCa at the first cached block of a drafted evaluation: run it on its real input and compare its
        draft (input + forecast residual) with the real output. A rejected draft makes this block the
        start of a computed evaluation; an accepted one fills the segment (the block's real output
        stands when it is the whole segment)."""
        self.call.segment_inputs = {s: args[s].clone() for s in streams}
        out = self._run(run_block, args, streams)
        if self.run.pending_verification:
            key, s = self.verify_keys[0]
            real = self.run.reference_chunk(out[s])
            draft = self.run.reference_chunk(self.call.segment_inputs[s] + self.run.fill((key, s), out[s]))
            self.call.compute = not self.run.verify(float(relative_l1(draft, real)))
        if self.call.compute:
            self.run.mark(g, REJECTED)
            return self._stored(kind, segment, segment_number, index, g, out, streams)
        self.run.mark(g, COMPUTED)  # the verification's work, whether or not its output is used
        if index == segment.last:
            return self._stored(kind, segment, segment_number, index, g, out, streams)
        return self._filled(segment, index, self.call.segment_inputs, streams)

    # -- token-level partial recompute ------------------------------------------------------
    def _text_length(self, kind: str, args: dict) -> int:
        layout = self.token_layouts[kind]
        if layout.text is None:
            return 0
        if layout.text in args:
            self.call.text_lengths[layout.text] = args[layout.text].shape[1]
        if layout.text not in self.call.text_lengths:
            raise ValueError(
                f"token-level recompute: the text length ('{layout.text}') of the {kind} blocks is unknown")
        return self.call.text_lengths[layout.text]

    def _tokens(self, kind: str, args: dict) -> torch.Tensor:
        """The image/video token rows of a block's token stream."""
        layout = self.token_layouts[kind]
        skip = self._text_length(kind, args) if layout.text_in_stream else 0
        return args[layout.stream][:, skip:]

    def _partial(self, kind, index, g, segment, args, run_block, streams):
        """A filled segment whose selected tokens run through each of its blocks; their fresh residual
        replaces the filled one at the segment's last block."""
        layout = self.token_layouts[kind]
        text = self._text_length(kind, args)
        skip = text if layout.text_in_stream else 0
        selection = self.call.selection
        tokens = self._tokens(kind, args).shape[1]
        cached = self._cached_attention(kind, index, text, tokens)
        first = index == segment.first
        text_rows = self._text_rows(kind, segment, text, tokens) if first else self.call.partial.text_rows
        ran_text = text if text_rows is None else text_rows.numel()
        ran_skip = ran_text if layout.text_in_stream else 0  # the text rows that ran ahead of the subset's tokens
        if first:
            fill = self.run.fill((segment.key, layout.stream), args[layout.stream])
            token_fill = fill[:, skip:]
            correction = self.run.tokens.correction(segment.key, self.run.uuids, token_fill)
            if correction is not None:
                token_fill += correction  # the fill is a fresh tensor: its token rows take the correction
            sub = gather(args, layout, streams, selection, text, all_keys=cached is not None, text_rows=text_rows)
            self.call.partial = _PartialSegment(token_fill, sub[layout.stream][:, ran_skip:].clone(), text_rows)
            out = {s: args[s] for s in streams}  # other streams come from the run at the segment's end
            out[layout.stream] = args[layout.stream] + fill
            if text_rows is not None and layout.text in streams:  # a text stream that does not run is filled
                out[layout.text] = self.run.fill((segment.key, layout.text), args[layout.text]).add_(args[layout.text])
        else:
            sub = gather(args, layout, streams, selection, text, self.call.partial.state, all_keys=cached is not None,
                         text_rows=text_rows)
            out = {s: args[s] for s in streams}
        if cached is not None:
            sub = self.with_attention(sub, SelfAttention(layout.attention, self._keeper(kind, index), cached,
                                                         positions_of(selection, text, text_rows)))
        sub_out = run_block(sub)
        self.call.partial.state = {s: sub_out[s] for s in streams}
        self.run.mark(g, PARTIAL, (ran_text + selection.numel()) / (text + tokens))  # rows run / rows of a full run
        if index == segment.last:  # rows that ran come from the run, the other rows keep their fill
            computed = sub_out[layout.stream][:, ran_skip:]
            change = self.run.tokens.update(segment.key, self.run.uuids, self.call.partial.fill, selection,
                                            computed - self.call.partial.inputs)
            rows = out[layout.stream][:, skip:]
            rows = (rows if change is None else rows + change).index_copy(1, selection, computed)
            filled_text = text_rows is not None
            text_part = (out if filled_text else sub_out)[layout.stream][:, :skip]
            out = {s: out[s] if filled_text and s == layout.text else sub_out[s] for s in streams}
            out[layout.stream] = torch.cat([text_part, rows], 1) if skip else rows
            self.run.account_tokens()
            self.call.partial = None
        return out

    def _text_rows(self, kind: str, segment, text: int, tokens: int) -> Optional[torch.Tensor]:
        """The text rows a partial segment runs: None (every one) unless the text is filled like the tokens that
        are not recomputed, which needs every block of the segment to attend to kept keys and values (the
        subset still sees the text there). Then none of a stream that holds text and tokens, and the first row
        of a text stream of its own (a block cannot take an empty stream; that row's output is not used)."""
        if (self.run.tokens.config.recompute_text or not text
                or any(self._cached_attention(kind, i, text, tokens) is None
                       for i in range(segment.first, segment.last + 1))):
            return None
        return torch.arange(0 if self.token_layouts[kind].text_in_stream else 1, device=self.call.selection.device)

    def _attends_cached(self, kind: str) -> bool:
        tokens = self.run.tokens
        return (tokens is not None and tokens.config.cached_attention and self.with_attention is not None
                and self.token_layouts[kind].attention is not None)

    def _keeper(self, kind: str, index: int) -> Callable:
        return lambda k, v: self.run.keep_keys_values((kind, index), k, v)

    def _cached_attention(self, kind: str, index: int, text: int, tokens: int) -> Optional[tuple]:
        """The block's kept self-attention keys and values of every position, when the subset attends to them."""
        if not self._attends_cached(kind):
            return None
        return self.run.tokens.cached_keys_values((kind, index), self.run.uuids, text + tokens,
                                                  self.token_layouts[kind].attention.sequence_dim)

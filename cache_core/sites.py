"""Where caching applies: the whole model, a span of blocks, or each block on its own.

A model is described to the engine as a layout: its block kinds in execution order with their
counts, e.g. Flux [("double_block", 19), ("single_block", 38)], Wan [("double_block", 30)].
Blocks are then numbered globally in that order.
"""
from __future__ import annotations

from dataclasses import dataclass

MODEL = "model"
SPAN = "span"
BLOCKS = "blocks"
SITE_KINDS = (MODEL, SPAN, BLOCKS)

PROBE = "probe"
CACHED = "cached"
CORRECTOR = "corrector"


@dataclass(frozen=True)
class Segment:
    """Consecutive cached blocks of one kind whose joint residual is cached as one value."""

    kind: str
    first: int  # local index within the kind
    last: int
    first_global: int

    @property
    def key(self) -> str:
        return f"{self.kind}[{self.first}:{self.last + 1}]"


@dataclass(frozen=True)
class Site:
    """`probe_blocks` (Fn) always run first and feed the probe indicator; `corrector_blocks` (Bn) always run last."""

    kind: str = MODEL
    probe_blocks: int = 0
    corrector_blocks: int = 0

    def __post_init__(self):
        if self.kind not in SITE_KINDS:
            raise ValueError(f"unknown cache site '{self.kind}'; available: {', '.join(SITE_KINDS)}")
        if self.probe_blocks < 0 or self.corrector_blocks < 0:
            raise ValueError("probe_blocks and corrector_blocks must be >= 0")
        if self.kind == MODEL and (self.probe_blocks or self.corrector_blocks):
            raise ValueError("probe/corrector blocks apply to the 'span' and 'blocks' sites, not to 'model'")

    @property
    def uses_blocks(self) -> bool:
        return self.kind != MODEL

    def validate(self, layout: list[tuple[str, int]]) -> None:
        depth = sum(n for _, n in layout)
        if self.probe_blocks + self.corrector_blocks >= depth:
            raise ValueError(
                f"probe_blocks ({self.probe_blocks}) + corrector_blocks ({self.corrector_blocks}) must leave at least "
                f"one cached block; this model has {depth} blocks: lower them to a sum of at most {depth - 1}")

    def rows(self, layout: list[tuple[str, int]]) -> list[str]:
        """Names of the trace rows: one per block, or one for the whole model."""
        if not self.uses_blocks:
            return [MODEL]
        return [f"{kind} {i}" for kind, n in layout for i in range(n)]

    def plan(self, layout: list[tuple[str, int]]) -> "BlockPlan":
        self.validate(layout)
        depth = sum(n for _, n in layout)
        cached_end = depth - self.corrector_blocks
        roles, segments, g = {}, [], 0
        for kind, n in layout:
            for i in range(n):
                if g < self.probe_blocks:
                    roles[(kind, i)] = (PROBE, g, None)
                elif g >= cached_end:
                    roles[(kind, i)] = (CORRECTOR, g, None)
                else:
                    extend = (self.kind == SPAN and segments and segments[-1].kind == kind
                              and segments[-1].last == i - 1)
                    if extend:
                        last = segments[-1]
                        segments[-1] = Segment(kind, last.first, i, last.first_global)
                    else:
                        segments.append(Segment(kind, i, i, g))
                    roles[(kind, i)] = (CACHED, g, len(segments) - 1)
                g += 1
        return BlockPlan(roles, segments, self.probe_blocks)


@dataclass(frozen=True)
class BlockPlan:
    """For each (kind, index): (role, global index, segment number or None)."""

    roles: dict
    segments: list
    decision_block: int  # global index of the first cached block, where the step's decision is taken

    def role(self, kind: str, index: int):
        return self.roles[(kind, index)]

    def segment_of(self, kind: str, index: int):
        number = self.roles[(kind, index)][2]
        return None if number is None else self.segments[number]

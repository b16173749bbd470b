"""The skip-branch site for U-Nets (DeepCache): shallow blocks run every step, the deep branch is filled.

A U-Net is laid out as input blocks, a middle block and output blocks, each input block feeding its mirror
output block through a skip connection. With depth d, the first d input blocks and the last d output
blocks are shallow; the blocks between them form the deep branch, whose result reaches the shallow part
only as the output of its last block. On a filled evaluation no deep layer runs: each returns an empty
placeholder (zero channels: it concatenates and travels through the U-Net's skip stack for free) and the
branch's last layer returns the cached (reused or forecast) branch output instead.
The indicator of every policy is the branch's input (the shallow features), compared across steps.
"""
from __future__ import annotations

from typing import Optional

import torch

from .engine import CacheRun
from .trace import COMPUTED

BRANCH_KEY = "deep branch"


class SkipBranch:
    def __init__(self, run: CacheRun, layout: list[tuple[str, int]], depth: int):
        rows = sum(n for _, n in layout)
        if not 1 <= depth <= rows // 2 - 1:
            raise ValueError(f"the skip-branch depth (probe_blocks) must be between 1 and {rows // 2 - 1} for this "
                             f"U-Net; got {depth}")
        self.run = run
        self.shallow = set(range(depth)) | set(range(rows - depth, rows))
        self.rows = rows
        self.compute = True

    def enter(self, h: torch.Tensor, uuids: list, sigma: float, forced_by: Optional[str] = None) -> bool:
        """At the branch's first layer: start the call, decide, and mark the rows. True to compute."""
        self.run.begin_call(uuids, sigma, h)
        self.compute = self.run.decide([BRANCH_KEY], lambda _kind: self._reference(h), forced_by=forced_by)
        for g in range(self.rows):
            self.run.mark(g, COMPUTED if self.compute or g in self.shallow else self.run.fill_action)
        return self.compute

    def _reference(self, h):
        reference = self.run.reference_chunk(h)
        return None if reference is None else reference.clone()

    @staticmethod
    def placeholder(x: torch.Tensor) -> torch.Tensor:
        return x[:, :0]

    def computed_exit(self, out: torch.Tensor) -> torch.Tensor:
        """The branch's output on a computed evaluation: stored for the evaluations that fill it."""
        self.run.store(BRANCH_KEY, out)
        reference = self.run.reference_chunk(out)
        if reference is not None:
            self.run.computed(reference, reference)  # the branch output is what is cached
        return out

    def filled_exit(self, like: torch.Tensor) -> torch.Tensor:
        return self.run.fill(BRANCH_KEY, like)

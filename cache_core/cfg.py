"""CFG-branch cache (FasterCache's idea): on most steps only the positive branch runs, and the
negative branch is filled from it plus the branches' difference cached at the last step both ran.

The difference is kept in the model-output space (eps or velocity: d = (x0_cond - x0_uncond) / sigma),
not in the denoised space, whose branch gap shrinks with sigma: x0_uncond = x0_cond - sigma * d.
"""
from __future__ import annotations

from typing import Optional

import torch


class CfgBranchCache:
    """Both branches computed every `refresh` computed evaluations (and whenever the input's shape changes)."""

    def __init__(self, refresh: int):
        self.refresh = refresh
        self.difference: Optional[torch.Tensor] = None
        self.since_refresh = 0

    @property
    def nbytes(self) -> int:
        return 0 if self.difference is None else self.difference.numel() * self.difference.element_size()

    def usable(self, x: torch.Tensor) -> bool:
        """A difference exists for this input's shape."""
        return self.difference is not None and self.difference.shape == x.shape

    def wants_both(self, x: torch.Tensor, sigma: torch.Tensor) -> bool:
        """No usable difference, a refresh due, or the last sigma (0): the negative branch should run."""
        return not self.usable(x) or self.since_refresh + 1 >= self.refresh or bool((sigma == 0).any())

    def refreshed(self, cond: torch.Tensor, uncond: torch.Tensor, sigma: torch.Tensor) -> None:
        """Both branches' denoised outputs of this evaluation; `sigma` broadcasts against them."""
        self.difference = ((cond - uncond) / sigma).detach().clone()
        self.since_refresh = 0

    def fill(self, cond: torch.Tensor, sigma: torch.Tensor, computed: bool = True) -> torch.Tensor:
        """The negative branch's denoised output from the positive one's; `computed`: the positive ran (it counts
        toward the next refresh) rather than being filled by the feature cache."""
        self.since_refresh += int(computed)
        return cond - sigma * self.difference.to(cond.dtype)

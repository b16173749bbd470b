"""Token-level partial recompute settings (ToCa / ClusCa style), validated now; the engine comes later."""
from __future__ import annotations

from dataclasses import dataclass

TOKEN_SELECTIONS = ("score", "cluster", "random")


@dataclass(frozen=True)
class TokenConfig:
    """Fraction of tokens recomputed on cached steps; `clusters` is used by the cluster selection."""

    selection: str = "score"
    ratio: float = 0.25
    clusters: int = 16

    def __post_init__(self):
        if self.selection not in TOKEN_SELECTIONS:
            raise ValueError(f"unknown token selection '{self.selection}'; available: {', '.join(TOKEN_SELECTIONS)}")
        if not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"token ratio must be in (0, 1], got {self.ratio}")
        if self.clusters < 1:
            raise ValueError(f"clusters must be >= 1, got {self.clusters}")

"""Where a cached value's image tokens are and the grid they lie on (for frequency-aware forecasters).

Two layouts occur: a latent-shaped value [B, C, *grid] (the whole-model site), and a token
sequence [B, L, D] whose image tokens are its last prod(grid) rows (block sites: Flux's image
stream, Flux single blocks' cat(txt, img), Wan's blocks). Adapters describe the grid per block
kind and stream; the engine passes it to the forecaster of each cached value.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class TokenGrid:
    shape: tuple  # e.g. (h, w) or (t, h, w)
    channels_first: bool = False  # True: value is [B, C, *shape]; False: [B, L, D] with image tokens last

    @property
    def tokens(self) -> int:
        return math.prod(self.shape)

    @property
    def feature_dim(self) -> int:
        return 1 if self.channels_first else -1

    def fits(self, value: torch.Tensor) -> bool:
        if self.channels_first:
            return tuple(value.shape[2:]) == tuple(self.shape)
        return value.ndim == 3 and value.shape[1] >= self.tokens

    def to_grid(self, value: torch.Tensor) -> torch.Tensor:
        """The image tokens as [B, D, *shape] (a view or copy; the other rows are left out)."""
        if self.channels_first:
            return value
        image = value[:, value.shape[1] - self.tokens:]
        return image.reshape(value.shape[0], *self.shape, value.shape[2]).movedim(-1, 1)

    def from_grid(self, grid_value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Inverse of `to_grid`: writes the image tokens back into a copy of `like`'s other rows."""
        if self.channels_first:
            return grid_value
        out = like.clone()
        out[:, like.shape[1] - self.tokens:] = grid_value.movedim(1, -1).reshape(like.shape[0], self.tokens, -1)
        return out


def grid_for(value: torch.Tensor, grid: Optional[TokenGrid]) -> Optional[TokenGrid]:
    """`grid` if it describes `value`, else None."""
    return grid if grid is not None and grid.fits(value) else None

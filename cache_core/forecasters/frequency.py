"""FreqCa: split a cached value by frequency over its token grid; reuse the low band, forecast the high band.

Low frequencies change slowly and smoothly between steps (reuse is accurate), high frequencies
change fast but continuously (a forecast tracks them): the split lets each have its own filler.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..grid import TokenGrid
from .history import Forecaster, Storage, nbytes
from .polynomial import HermiteForecaster

HIGH_BAND_ORDER = 2


def low_pass(grid_value: torch.Tensor, cutoff: float) -> torch.Tensor:
    """The part of [B, C, *grid] whose spatial frequency (|f| / Nyquist, euclidean over the grid dims) is <= cutoff."""
    dims = tuple(range(2, grid_value.ndim))
    work = grid_value.to(torch.promote_types(grid_value.dtype, torch.float32))
    spectrum = torch.fft.rfftn(work, dim=dims)
    radius = torch.zeros(spectrum.shape[2:], device=work.device)
    for axis, size in enumerate(grid_value.shape[2:]):
        last = axis == len(dims) - 1
        freq = (torch.fft.rfftfreq(size) if last else torch.fft.fftfreq(size)).to(work.device) / 0.5
        shape = [1] * len(dims)
        shape[axis] = -1
        radius = radius + freq.abs().reshape(shape) ** 2
    mask = (radius.sqrt() <= cutoff).to(spectrum.dtype)
    return torch.fft.irfftn(spectrum * mask, s=grid_value.shape[2:], dim=dims).to(grid_value.dtype)


def split_bands(value: torch.Tensor, grid: Optional[TokenGrid], cutoff: float) -> tuple:
    """(low, high) with low + high = value; rows outside the grid (e.g. text tokens) are all high band."""
    if grid is None:
        return torch.zeros_like(value), value
    low = grid.from_grid(low_pass(grid.to_grid(value), cutoff), torch.zeros_like(value))
    return low, value - low


class FrequencyForecaster(Forecaster):
    """Low band: the newest computed one, reused. High band: Hermite (HiCache) order 2 in sigma."""

    def __init__(self, cutoff: float, contraction: float, grid: Optional[TokenGrid],
                 storage: Optional[Storage] = None):
        self.cutoff = cutoff
        self.grid = grid
        self.storage = storage or Storage()
        self.low: Optional[torch.Tensor] = None
        self.high = HermiteForecaster(HIGH_BAND_ORDER, contraction, self.storage)

    def update(self, t: float, value: torch.Tensor) -> None:
        low, high = split_bands(value.detach(), self.grid, self.cutoff)
        self.low = self.storage.keep(low, copy=False)
        self.high.update(t, high)

    @property
    def ready(self) -> bool:
        return self.low is not None

    def predict(self, t: float, device: Optional[torch.device] = None) -> torch.Tensor:
        self._require()
        return self.low.to(device=device or self.low.device, dtype=self.high.dtype) + self.high.predict(t, device)

    def latest(self, device: Optional[torch.device] = None, copy: bool = True) -> torch.Tensor:
        self._require()
        return self.low.to(device=device or self.low.device, dtype=self.high.dtype) + self.high.latest(device, False)

    @property
    def nbytes(self) -> int:
        return (nbytes([self.low]) if self.low is not None else 0) + self.high.nbytes

    def lower_order(self) -> bool:
        return self.high.lower_order()

"""Polynomial forecasters in sigma: Taylor (TaylorSeer) and its relatives.

Time is the sampler's own variable (sigma), never a step index, so non-uniform schedules and
solvers that evaluate the model several times per step are forecast correctly.
"""
from __future__ import annotations

from typing import Optional

import torch

from .history import Forecaster, nbytes, repeated_index, stored


class TaylorForecaster(Forecaster):
    """Taylor expansion about the newest computed point, with derivatives from divided differences.

    The Newton form P(t) = sum_j D_j * prod_{i<j} (t - t_i) over the last order+1 computed points
    is the Taylor series whose derivatives are estimated by finite differences; unlike a fixed-step
    difference it is exact for any polynomial of degree <= order on non-uniform grids.
    Differences above order 0 are kept in float32: they grow like 1/dt^j and overflow half precision.
    """

    def __init__(self, order: int, store_device: Optional[torch.device] = None):
        self.order = order
        self.store_device = store_device
        self.times: list[float] = []  # newest first
        self.diffs: list[torch.Tensor] = []  # diffs[j] = f[t_0, ..., t_j] (newest first)
        self.dtype: Optional[torch.dtype] = None

    def update(self, t: float, value: torch.Tensor) -> None:
        repeated = repeated_index(self.times, t)
        if repeated is not None:  # diffs[j] involves t_0..t_j only: the points newer than the repeat stay valid
            self.times, self.diffs = self.times[:repeated], self.diffs[:repeated]
        self.dtype = value.dtype
        precision = torch.promote_types(value.dtype, torch.float32) if self.order > 0 else value.dtype
        new_diffs = [stored(value, self.store_device, precision)]
        for j in range(1, min(self.order, len(self.diffs)) + 1):
            new_diffs.append((new_diffs[j - 1] - self.diffs[j - 1]) / (t - self.times[j - 1]))
        self.diffs = new_diffs
        self.times = ([t] + self.times)[: self.order + 1]

    @property
    def ready(self) -> bool:
        return bool(self.diffs)

    def predict(self, t: float, device: Optional[torch.device] = None) -> torch.Tensor:
        self._require()
        out = self.diffs[0].clone()
        weight = 1.0
        for j in range(1, len(self.diffs)):
            weight *= t - self.times[j - 1]
            out.add_(self.diffs[j], alpha=weight)
        return out.to(device=device or out.device, dtype=self.dtype)

    def latest(self, device: Optional[torch.device] = None) -> torch.Tensor:
        self._require()
        return self.diffs[0].to(device=device or self.diffs[0].device, dtype=self.dtype)

    @property
    def nbytes(self) -> int:
        return nbytes(self.diffs)

"""How a skipped computation is filled: forecasters over a site's history of computed values.

Time is the sampler's own variable (sigma), never a step index, so non-uniform schedules and
solvers that evaluate the model several times per step are forecast correctly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

MAX_TAYLOR_ORDER = 4


@dataclass(frozen=True)
class ForecasterConfig:
    """`order` 0 is plain reuse of the last computed value; 1-4 extrapolate a polynomial in sigma."""

    kind: str = "reuse"
    order: int = 0

    def __post_init__(self):
        if self.kind not in FORECASTER_KINDS:
            raise ValueError(f"unknown forecaster '{self.kind}'; available: {', '.join(FORECASTER_KINDS)}")
        if not 0 <= self.order <= MAX_TAYLOR_ORDER:
            raise ValueError(f"forecaster order must be between 0 and {MAX_TAYLOR_ORDER}, got {self.order}")
        if self.kind == "reuse" and self.order != 0:
            raise ValueError("the 'reuse' forecaster has order 0; choose 'taylor' for order 1-4")

    @property
    def label(self) -> str:
        return "reuse" if self.order == 0 else f"{self.kind}{self.order}"

    def new_state(self) -> "TaylorForecaster":
        return TaylorForecaster(self.order)


FORECASTER_KINDS = ("reuse", "taylor")


class TaylorForecaster:
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
        if self.times and t == self.times[0]:
            self.times, self.diffs = [], []  # same time twice: a restarted trajectory, not a new point
        self.dtype = value.dtype
        target = self.store_device or value.device
        precision = torch.promote_types(value.dtype, torch.float32) if self.order > 0 else value.dtype
        work = value.detach().to(device=target, dtype=precision, copy=True)
        new_diffs = [work]
        for j in range(1, min(self.order, len(self.diffs)) + 1):
            new_diffs.append((new_diffs[j - 1] - self.diffs[j - 1]) / (t - self.times[j - 1]))
        self.diffs = new_diffs
        self.times = ([t] + self.times)[: self.order + 1]

    @property
    def ready(self) -> bool:
        return bool(self.diffs)

    def predict(self, t: float, device: Optional[torch.device] = None) -> torch.Tensor:
        if not self.diffs:
            raise RuntimeError("forecast requested before any value was computed")
        out = self.diffs[0].clone()
        weight = 1.0
        for j in range(1, len(self.diffs)):
            weight *= t - self.times[j - 1]
            out.add_(self.diffs[j], alpha=weight)
        return out.to(device=device or out.device, dtype=self.dtype)

    @property
    def nbytes(self) -> int:
        return sum(d.numel() * d.element_size() for d in self.diffs)

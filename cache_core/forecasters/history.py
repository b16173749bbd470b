"""What every forecaster shares: its interface, and how a repeated time enters a history.

Samplers such as heunpp2 return to a sigma they used two evaluations earlier (0.976, 0.941,
0.976, ...). A second value at a (nearly) equal time is the newer estimate of the same point: it
replaces the older one, so no formula ever divides by a time difference of ~0.
"""
from __future__ import annotations

from typing import Optional

import torch

RELATIVE_TIME_TOLERANCE = 1e-4


def same_time(a: float, b: float) -> bool:
    return abs(a - b) <= RELATIVE_TIME_TOLERANCE * max(abs(a), abs(b), 1e-3)


def repeated_index(times: list, t: float) -> Optional[int]:
    """Index of the first time in `times` (newest first) nearly equal to `t`, or None."""
    return next((i for i, s in enumerate(times) if same_time(s, t)), None)


def stored(value: torch.Tensor, device: Optional[torch.device], dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """A detached copy on the store device (cached tensors never alias the model's)."""
    return value.detach().to(device=device or value.device, dtype=dtype or value.dtype, copy=True)


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class Forecaster:
    """A site's history of computed values at sigmas, and its forecast at another sigma.

    `latest()` is the newest computed value (what a reuse fill returns; the engine's guard falls
    back to it when a forecast is not finite or overshoots).
    """

    def update(self, t: float, value: torch.Tensor) -> None:
        raise NotImplementedError

    def predict(self, t: float, device: Optional[torch.device] = None) -> torch.Tensor:
        raise NotImplementedError

    def latest(self, device: Optional[torch.device] = None) -> torch.Tensor:
        raise NotImplementedError

    @property
    def ready(self) -> bool:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        raise NotImplementedError

    def _require(self) -> None:
        if not self.ready:
            raise RuntimeError("forecast requested before any value was computed")

"""What every forecaster shares: its interface, and how a repeated time enters a history.

Samplers such as heunpp2 return to a sigma they used two evaluations earlier (0.976, 0.941,
0.976, ...). A second value at a (nearly) equal time is the newer estimate of the same point: it
replaces the older one, so no formula ever divides by a time difference of ~0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..kernels.forecast import combine_all

RELATIVE_TIME_TOLERANCE = 1e-4


def same_time(a: float, b: float) -> bool:
    return abs(a - b) <= RELATIVE_TIME_TOLERANCE * max(abs(a), abs(b), 1e-3)


def repeated_index(times: list, t: float) -> Optional[int]:
    """Index of the first time in `times` (newest first) nearly equal to `t`, or None."""
    return next((i for i, s in enumerate(times) if same_time(s, t)), None)


@dataclass(frozen=True)
class Storage:
    """Where and in which dtype forecasters keep computed values (None: the value's own device / dtype).

    `dtype` applies to values; differences and sums are kept in work_dtype whatever it is. A copy from a
    GPU to the CPU goes to pinned memory asynchronously: arithmetic on kept values runs on the value's
    device (stream-ordered), and the engine synchronises once before it reads kept values on the CPU.
    """

    device: Optional[torch.device] = None
    dtype: Optional[torch.dtype] = None

    @property
    def offloads(self) -> bool:
        return self.device is not None and self.device.type == "cpu"

    def keep(self, value: torch.Tensor, dtype: Optional[torch.dtype] = None, copy: bool = True) -> torch.Tensor:
        """`value` detached on the storage device, in `dtype` (default: the storage dtype); a copy (cached tensors
        never alias the model's) unless copy=False and it is already there (a fresh intermediate)."""
        device = self.device or value.device
        dtype = dtype or self.dtype or value.dtype
        if device.type == "cpu" and value.device.type == "cuda":
            kept = torch.empty(value.shape, dtype=dtype, device=device, pin_memory=True)
            return kept.copy_(value.detach().to(dtype), non_blocking=True)
        return value.detach().to(device=device, dtype=dtype, copy=copy)

    def holds(self, value: torch.Tensor) -> bool:
        """Kept tensors live where `value` does (history tables can then be updated in place)."""
        return self.device is None or self.device == value.device


def nbytes(tensors) -> int:
    """Bytes held by `tensors` (right on meta tensors too: the memory report runs the engine on them)."""
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

    def latest(self, device: Optional[torch.device] = None, copy: bool = True) -> torch.Tensor:
        """copy=False may return the kept tensor itself (read it before the next update, never write to it)."""
        raise NotImplementedError

    @property
    def ready(self) -> bool:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        raise NotImplementedError

    @property
    def accuracy_order(self) -> int:
        """p: the forecast's error at a distance h from the newest computed point shrinks like h^(p+1) (0 for
        reuse, and for fits that do not pass through the newest point); the online selection rescales
        back-tests to the fill's distance by it."""
        return 0

    def fused_terms(self, t: float) -> Optional[tuple]:
        """(terms, weights, dtype) when the forecast at t is sum_j weights[j] * terms[j] returned in dtype (then
        `predict_all` evaluates it fused with the others), else None."""
        return None

    def lower_order(self) -> bool:
        """Forecast from one history entry less, freeing its memory (the memory budget's first step); False if
        the forecaster cannot."""
        return False

    def _require(self) -> None:
        if not self.ready:
            raise RuntimeError("forecast requested before any value was computed")


def predict_all(forecasters: list, times: list) -> list:
    """[f.predict(t) for f, t in zip(forecasters, times)], the weighted-sum forecasts evaluated in one fused pass."""
    out: list = [None] * len(forecasters)
    fused = {}
    for i, (forecaster, t) in enumerate(zip(forecasters, times)):
        terms = forecaster.fused_terms(t)
        if terms is None:
            out[i] = forecaster.predict(t)
        else:
            fused[i] = terms
    if fused:
        tables, weights, dtypes = zip(*fused.values())
        for i, forecast in zip(fused, combine_all(list(tables), list(weights), list(dtypes))):
            out[i] = forecast
    return out

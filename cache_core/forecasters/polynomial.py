"""Polynomial forecasters in sigma: Taylor (TaylorSeer) and its relatives.

Time is the sampler's own variable (sigma), never a step index, so non-uniform schedules and
solvers that evaluate the model several times per step are forecast correctly.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ..kernels.forecast import combine, newton_update_, work_dtype
from .history import Forecaster, Storage, nbytes, repeated_index


class TaylorForecaster(Forecaster):
    """Taylor expansion about the newest computed point, with derivatives from divided differences.

    The Newton form P(t) = sum_j D_j * prod_{i<j} (t - t_i) over the last order+1 computed points
    is the Taylor series whose derivatives are estimated by finite differences; unlike a fixed-step
    difference it is exact for any polynomial of degree <= order on non-uniform grids.
    Differences above order 0 are kept in float32: they grow like 1/dt^j and overflow half precision.
    """

    def __init__(self, order: int, storage: Optional[Storage] = None):
        self.order = order
        self.storage = storage or Storage()
        self.times: list[float] = []  # newest first
        self.diffs: list[torch.Tensor] = []  # diffs[j] = f[t_0, ..., t_j] (newest first)
        self.dtype: Optional[torch.dtype] = None

    def update(self, t: float, value: torch.Tensor) -> None:
        repeated = repeated_index(self.times, t)
        if repeated is not None:  # diffs[j] involves t_0..t_j only: the points newer than the repeat stay valid
            self.times, self.diffs = self.times[:repeated], self.diffs[:repeated]
        self.dtype = value.dtype
        steps = [t - s for s in self.times]
        if len(self.diffs) == self.order + 1 and self.storage.holds(value):  # a full table: update it in place
            self.diffs = newton_update_(self.diffs, value.detach(), steps)
        else:  # the value itself in the storage dtype, differences in float32, computed on the value's device
            new_diffs = [self.storage.keep(value)]
            current = value.detach().to(work_dtype(value.dtype))
            for j in range(1, min(self.order, len(self.diffs)) + 1):
                current = (current - self.diffs[j - 1].to(value.device)) / steps[j - 1]
                new_diffs.append(self.storage.keep(current, current.dtype, copy=False))
            self.diffs = new_diffs
        self.times = ([t] + self.times)[: self.order + 1]

    @property
    def ready(self) -> bool:
        return bool(self.diffs)

    def weights(self, t: float) -> list:
        """Scalar weight of each divided difference in the forecast at t (Newton: prod_{i<j} (t - t_i))."""
        weights = [1.0]
        for j in range(1, len(self.diffs)):
            weights.append(weights[-1] * (t - self.times[j - 1]))
        return weights

    def predict(self, t: float, device: Optional[torch.device] = None) -> torch.Tensor:
        self._require()
        return combine(self.diffs, self.weights(t), device, self.dtype)

    def fused_terms(self, t: float) -> Optional[tuple]:
        self._require()
        return self.diffs, self.weights(t), self.dtype

    def latest(self, device: Optional[torch.device] = None, copy: bool = True) -> torch.Tensor:
        self._require()
        return self.diffs[0].to(device=device or self.diffs[0].device, dtype=self.dtype, copy=copy)  # updated in place

    @property
    def nbytes(self) -> int:
        return nbytes(self.diffs)

    @property
    def accuracy_order(self) -> int:
        return len(self.diffs) - 1  # the order the points so far allow

    def lower_order(self) -> bool:
        if self.order == 0:
            return False
        self.order -= 1
        self.times, self.diffs = self.times[: self.order + 1], self.diffs[: self.order + 1]
        return True


def _newton_to_taylor(offsets: list) -> list:
    """Rows j: coefficients (by power of s = t - t_0) of the Newton basis prod_{i<j} (s - offsets[i])."""
    rows, poly = [], [1.0]
    for j in range(len(offsets) + 1):
        rows.append(list(poly))
        if j < len(offsets):
            poly = [0.0] + poly  # * s
            for k in range(len(poly) - 1):
                poly[k] -= offsets[j] * poly[k + 1]
    return rows


def hermite(k: int, x: float) -> float:
    """Physicists' Hermite polynomial H_k(x) (H_0 = 1, H_1 = 2x, H_{k+1} = 2x H_k - 2k H_{k-1})."""
    previous, current = 0.0, 1.0
    for n in range(k):
        previous, current = current, 2 * x * current - 2 * n * previous
    return current


class HermiteForecaster(TaylorForecaster):
    """HiCache: the Taylor coefficients c_k about the newest point, on a contracted Hermite basis.

    F(t) = sum_k c_k h^k sigma^k H_k(sigma u), u = (t - t_0) / h, h = t_0 - t_1 (the newest spacing
    of computed points), sigma the contraction. sigma = 1/sqrt(2) keeps the first-order term of
    Taylor exactly and shifts the higher ones (its H_2 term is c_2 h^2 (u^2 - 1)); smaller sigma damps more.
    The c_k are those of the Newton polynomial (TaylorForecaster), so Taylor is sum_k c_k (t - t_0)^k.
    """

    def __init__(self, order: int, contraction: float, storage: Optional[Storage] = None):
        super().__init__(order, storage)
        self.contraction = contraction

    @property
    def accuracy_order(self) -> int:
        return 0  # the contraction rescales the first-order term (and H_2 shifts the newest point)

    def weights(self, t: float) -> list:
        """Scalar weight of each divided difference in the forecast at t."""
        n = len(self.diffs)
        if n == 1:
            return [1.0]
        t0, h, c = self.times[0], self.times[0] - self.times[1], self.contraction
        u = (t - t0) / h
        basis = [h ** k * c ** k * hermite(k, c * u) for k in range(n)]
        rows = _newton_to_taylor([s - t0 for s in self.times[:n - 1]])
        return [1.0] + [sum(row[k] * basis[k] for k in range(1, len(row))) for row in rows[1:]]


class ValueHistory(Forecaster):
    """The last `capacity` computed values (in their own dtype); a forecast is a weighted sum of them."""

    def __init__(self, capacity: int, storage: Optional[Storage] = None):
        self.capacity = capacity
        self.storage = storage or Storage()
        self.times: list[float] = []  # newest first
        self.values: list[torch.Tensor] = []

    def update(self, t: float, value: torch.Tensor) -> None:
        repeated = repeated_index(self.times, t)
        if repeated is not None:
            del self.times[repeated], self.values[repeated]
        self.dtype = value.dtype  # forecasts come back in it, whatever the storage dtype
        self.times = ([t] + self.times)[: self.capacity]
        self.values = ([self.storage.keep(value)] + self.values)[: self.capacity]

    @property
    def ready(self) -> bool:
        return bool(self.values)

    def weights(self, t: float) -> list:
        raise NotImplementedError

    def predict(self, t: float, device: Optional[torch.device] = None) -> torch.Tensor:
        self._require()
        known = repeated_index(self.times, t)
        if known is not None:  # a computed point: its value (no formula divides by t - t_i ~ 0)
            return self.values[known].to(device=device or self.values[known].device, dtype=self.dtype, copy=True)
        return combine(self.values, self.weights(t), device, self.dtype)

    def fused_terms(self, t: float) -> Optional[tuple]:
        self._require()
        if repeated_index(self.times, t) is not None:  # a computed point: predict returns its value
            return None
        return self.values, self.weights(t), self.dtype

    def latest(self, device: Optional[torch.device] = None, copy: bool = True) -> torch.Tensor:
        self._require()
        return self.values[0].to(device=device or self.values[0].device, dtype=self.dtype, copy=copy)

    @property
    def nbytes(self) -> int:
        return nbytes(self.values)


def lagrange_weights(times: list, t: float) -> list:
    """Weights w_i with sum_i w_i f(t_i) = P(t), P the polynomial through all (t_i, f(t_i))."""
    weights = []
    for i, ti in enumerate(times):
        w = 1.0
        for j, tj in enumerate(times):
            if j != i:
                w *= (t - tj) / (ti - tj)
        weights.append(w)
    return weights


class AdamsBashforthForecaster(ValueHistory):
    """AB-Cache: a linear combination of the last k cached values, with Adams-Bashforth weights in sigma.

    On a uniform grid the weights are AB-Cache's (k=2: 2, -1; k=3: 3, -3, 1); for non-uniform
    sigma steps they are the Lagrange extrapolation weights of the k points, exact on polynomials
    of degree < k. The same polynomial as Taylor order k-1, kept as k values in the model's dtype
    (half the memory of float32 differences in half precision) and combined with float64 weights.
    """

    def __init__(self, order: int, storage: Optional[Storage] = None):
        super().__init__(order, storage)

    def weights(self, t: float) -> list:
        return lagrange_weights(self.times, t)

    @property
    def accuracy_order(self) -> int:
        return len(self.values) - 1

    def lower_order(self) -> bool:
        if self.capacity == 1:
            return False
        self.capacity -= 1
        self.times, self.values = self.times[: self.capacity], self.values[: self.capacity]
        return True


def _slope_at_first(times: list, values: list):
    """Derivative at times[0] of the polynomial (degree <= 2) through 2 or 3 points; values may be weight vectors."""
    d01 = (values[0] - values[1]) / (times[0] - times[1])
    if len(times) == 2:
        return d01
    d12 = (values[1] - values[2]) / (times[1] - times[2])
    return d01 + (d01 - d12) / (times[0] - times[2]) * (times[0] - times[1])


class FoCaForecaster(ValueHistory):
    """FoCa: forecast with a BDF2 predictor, then calibrate with a Heun-style corrector (feature ODE dF/dt = g).

    g_0 = BDF2 slope at the newest point (from the last three), predictor F~ = F_0 + h g_0 (h = t - t_0);
    the corrector slope g~ is the BDF2 slope at t through (t, F~), (t_0, F_0), (t_1, F_1), and
    F(t) = F_0 + h/2 (g_0 + g~). Exact on lines; it damps curvature (a quarter of the quadratic term
    on a uniform grid), which keeps long strides stable where a quadratic extrapolation overshoots.
    """

    def __init__(self, storage: Optional[Storage] = None):
        super().__init__(3, storage)

    @property
    def accuracy_order(self) -> int:
        return min(1, len(self.values) - 1)  # exact on lines; it damps curvature

    def weights(self, t: float) -> list:
        n = len(self.values)
        if n == 1:
            return [1.0]
        basis = list(np.eye(n))
        h = t - self.times[0]
        slope0 = _slope_at_first(self.times, basis)
        predicted = basis[0] + h * slope0
        slope_t = _slope_at_first([t] + self.times[:2], [predicted] + basis[:2])
        return list(basis[0] + 0.5 * h * (slope0 + slope_t))

"""Spectrum: a global Chebyshev fit in sigma over every computed point of the run (ridge regression).

A local extrapolation's error compounds with the stride; a least-squares fit over the whole run
does not. Memory stays bounded: only the normal equations are accumulated, a (degree+1)^2 float64
Gram matrix and degree+1 moment tensors sum_i T_j(x_i) F_i, plus the newest value.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ..kernels.forecast import work_dtype
from .history import Forecaster, Storage, nbytes


def chebyshev(x: float, degree: int) -> np.ndarray:
    """T_0(x) .. T_degree(x)."""
    values = [1.0, x][: degree + 1]
    while len(values) <= degree:
        values.append(2 * x * values[-1] - values[-2])
    return np.array(values)


class SpectrumForecaster(Forecaster):
    """Ridge fit F(t) ~ sum_j c_j T_j(x), x = 2 t / t_first - 1 (the run's sigma range [0, t_first] -> [-1, 1]).

    The ridge penalty spares c_0 (it would pull the forecast towards zero). Before degree+1 points
    the fit uses the degree the points allow. A repeated time is a second observation of the same
    point: least squares averages it, nothing divides by a time difference.
    """

    def __init__(self, degree: int, ridge: float, storage: Optional[Storage] = None):
        self.degree = degree
        self.ridge = ridge
        self.storage = storage or Storage()
        self.scale: Optional[float] = None
        self.count = 0
        self.gram = np.zeros((degree + 1, degree + 1))
        self.moments: list[torch.Tensor] = []
        self.newest: Optional[torch.Tensor] = None

    def _features(self, t: float) -> np.ndarray:
        return chebyshev(2.0 * t / self.scale - 1.0, self.degree)

    def update(self, t: float, value: torch.Tensor) -> None:
        if self.scale is None:
            self.scale = max(abs(t), 1e-6)
        phi = self._features(t)
        self.gram += np.outer(phi, phi)
        work = value.detach().to(work_dtype(value.dtype))
        if not self.moments:
            self.moments = [self.storage.keep(work * float(p), work.dtype, copy=False) for p in phi]
        elif self.storage.holds(value):
            for moment, p in zip(self.moments, phi):
                moment.add_(work, alpha=float(p))
        else:  # offloaded: add on the value's device, keep the sums
            self.moments = [self.storage.keep(moment.to(value.device).add_(work, alpha=float(p)), work.dtype,
                                              copy=False) for moment, p in zip(self.moments, phi)]
        self.newest = self.storage.keep(value)
        self.dtype = value.dtype  # forecasts come back in it, whatever the storage dtype
        self.count += 1

    @property
    def ready(self) -> bool:
        return self.newest is not None

    def weights(self, t: float) -> np.ndarray:
        """w with forecast = sum_j w_j moments_j, i.e. phi(t)^T (G + ridge D)^+ ."""
        m = min(self.degree, self.count - 1) + 1
        penalty = np.diag([0.0] + [self.ridge] * (m - 1))
        return np.linalg.pinv(self.gram[:m, :m] + penalty, rcond=1e-12, hermitian=True) @ self._features(t)[:m]

    def predict(self, t: float, device: Optional[torch.device] = None) -> torch.Tensor:
        self._require()
        out = self.moments[0] * 0.0
        for weight, moment in zip(self.weights(t), self.moments):
            out.add_(moment, alpha=float(weight))
        return out.to(device=device or out.device, dtype=self.dtype)

    def latest(self, device: Optional[torch.device] = None, copy: bool = True) -> torch.Tensor:
        self._require()
        return self.newest.to(device=device or self.newest.device, dtype=self.dtype, copy=copy)

    @property
    def nbytes(self) -> int:
        return nbytes(self.moments) + (nbytes([self.newest]) if self.newest is not None else 0)

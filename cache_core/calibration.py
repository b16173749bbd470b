"""MagCache's calibration: the magnitude-ratio curve of a model's cached residual, stored per model and schedule.

gamma_t = mean over tokens of |r_t| / |r_prev| (token norms over the channel dimension: the last one of
a block's [batch, tokens, channels] hidden state, dimension 1 of a latent-shaped model output) is
recorded from one uncached run. It is kept as the cumulative log ratio L(sigma) over the run's sigmas,
so the ratio between any two sigmas of another schedule of the same sampler is exp(L(b) - L(a)) with
L linearly interpolated: other step counts of the same schedule family are interpolated, not guessed.

Files (JSON, one per model fingerprint and sampler) hold one entry per calibrated schedule. A run
uses the entry with its exact schedule, else the one with the nearest step count whose sigma range
covers the run's and whose step count is within a factor STEP_RATIO_LIMIT; otherwise it calibrates.
"""
from __future__ import annotations

import json
import math
import os
import re
from typing import Optional

import numpy as np
import torch

STEP_RATIO_LIMIT = 2.0
SIGMA_TOLERANCE = 1e-4
FORMAT = "feature_cache.magcache/1"


def token_norms(residual: torch.Tensor) -> torch.Tensor:
    channel_dim = -1 if residual.ndim == 3 else 1
    return residual.float().norm(dim=channel_dim)


class MagnitudeCurve:
    """Cumulative log magnitude ratio over sigma (sigma descending, as the sampler runs)."""

    def __init__(self, points):
        points = [(float(s), float(v)) for s, v in points]
        if len(points) < 2:
            raise ValueError("a magnitude curve needs at least two calibrated evaluations")
        # a sigma evaluated twice (Heun's corrector, then the next step) keeps its last value
        by_sigma = {}
        for s, v in points:
            by_sigma[s] = v
        ordered = sorted(by_sigma.items())  # ascending for np.interp
        self.sigmas = np.array([s for s, _ in ordered])
        self.values = np.array([v for _, v in ordered])
        self.points = tuple(points)

    def log_at(self, sigma: float) -> float:
        return float(np.interp(sigma, self.sigmas, self.values))

    def ratio(self, sigma_from: float, sigma_to: float) -> float:
        return math.exp(self.log_at(sigma_to) - self.log_at(sigma_from))

    def covers(self, sigmas) -> bool:
        lo, hi = self.sigmas[0], self.sigmas[-1]
        return all(lo - SIGMA_TOLERANCE <= s <= hi + SIGMA_TOLERANCE for s in sigmas if s > 0)

    @staticmethod
    def recorder() -> "CurveRecorder":
        return CurveRecorder()


class CurveRecorder:
    """Builds the curve from the residuals of an uncached run, one evaluation at a time."""

    def __init__(self):
        self.previous: Optional[torch.Tensor] = None
        self.points: list = []
        self.cumulative = 0.0

    def add(self, sigma: float, residual: torch.Tensor) -> None:
        norms = token_norms(residual)
        if self.previous is not None and self.previous.shape == norms.shape:
            gamma = float((norms / self.previous.clamp_min(1e-12)).mean())
            self.cumulative += math.log(max(gamma, 1e-12))
        self.previous = norms
        self.points.append((float(sigma), self.cumulative))

    def curve(self) -> Optional[tuple]:
        return tuple(self.points) if len(self.points) >= 2 else None


def _file(directory: str, fingerprint: str, sampler: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{fingerprint}_{sampler}")
    return os.path.join(directory, f"{safe}.json")


def _entries(path: str) -> list:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        data = json.load(f)
    return data.get("entries", []) if data.get("format") == FORMAT else []


def save(directory: str, fingerprint: str, sampler: str, schedule: list, curve: tuple) -> str:
    """Store (replacing the entry of the same schedule) and return the file's path."""
    os.makedirs(directory, exist_ok=True)
    path = _file(directory, fingerprint, sampler)
    schedule = [float(s) for s in schedule]
    entries = [e for e in _entries(path) if not _same_schedule(e["schedule"], schedule)]
    entries.append({"steps": len(schedule) - 1, "schedule": schedule, "curve": [list(p) for p in curve]})
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"format": FORMAT, "fingerprint": fingerprint, "sampler": sampler, "entries": entries}, f)
    os.replace(tmp, path)
    return path


def _same_schedule(a, b) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= SIGMA_TOLERANCE for x, y in zip(a, b))


def load(directory: str, fingerprint: str, sampler: str, schedule: list) -> tuple[Optional[tuple], str]:
    """The curve for this schedule and how it was found (for the report); (None, why) when none fits."""
    schedule = [float(s) for s in schedule]
    path = _file(directory, fingerprint, sampler)
    entries = _entries(path)
    if not entries:
        return None, f"no MagCache calibration for this model and sampler '{sampler}' (looked for {path})"
    for entry in entries:
        if _same_schedule(entry["schedule"], schedule):
            return tuple(tuple(p) for p in entry["curve"]), f"MagCache calibration of this schedule from {path}"
    steps = len(schedule) - 1
    usable = [e for e in entries
              if MagnitudeCurve(e["curve"]).covers(schedule)
              and 1.0 / STEP_RATIO_LIMIT <= e["steps"] / steps <= STEP_RATIO_LIMIT]
    if not usable:
        known = ", ".join(str(e["steps"]) for e in entries)
        return None, (f"MagCache calibrations of this model and sampler exist for {known} steps but none covers this "
                      f"{steps}-step schedule (its sigma range, steps within x{STEP_RATIO_LIMIT:g})")
    best = min(usable, key=lambda e: abs(e["steps"] - steps))
    return (tuple(tuple(p) for p in best["curve"]),
            f"MagCache calibration of {best['steps']} steps interpolated to {steps} steps from {path}")

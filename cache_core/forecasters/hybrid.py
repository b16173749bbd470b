"""Forecasters that choose among candidate forecasters by back-testing them on the values computed.

Every candidate sees every computed value. Before a candidate learns a new value it forecasts it
(a held-out point, at the stride the fills actually span): its error is accumulated per feature group.

- HyCa (`hyca`): after `TRIALS` held-out points each group keeps its best candidate for the rest of
  the run and the others are dropped (their memory with them).
- Online selection (`auto`): the choice is revised at every computed point from errors that decay
  (older back-tests weigh `decay` times less at each new one), so the forecaster follows the run: a
  smooth trajectory (Euler on a flow model) picks a polynomial forecast, a solver or schedule whose
  values a forecast overshoots (multistep solvers, karras/beta) falls back to reuse, and a run that
  changes character midway changes its choice. The back-tests run on computed evaluations only.
  A back-test spans the whole gap between two computes, but a fill lies at a distance d from the newest
  compute, mostly shorter, and a forecast of order p errs like h^(p+1): a fill nearer than H, the back-tests'
  mean gap (decayed alike), chooses by the errors rescaled to its distance, times (d / H)^(2(p+1)) with p
  each candidate's order now (at most RESCALED_ORDER). Near the last compute a higher order gains most, so a
  run whose whole gaps favour reuse (Wan video and Flux at 5x) can still fill its near steps by a forecast.

The choice is shared by the forecasters of one cached value across conditionings (errors summed):
with CFG, cond forecast and uncond reused would amplify their difference by the guidance scale.
"""
from __future__ import annotations

from typing import Optional

import torch

from .history import Forecaster, repeated_index, same_time

TRIALS = 3
# Rescaling a back-test to a nearer fill assumes the leading error term of a Taylor remainder, which holds
# while the value changes little across a gap: only groups whose relative squared change per back-test
# stays below SMALL_CHANGE are rescaled (the smooth bundled cases change ~0.01-0.02, Wan on dpmpp_2m/karras
# at 5x >= 0.15), and a candidate is credited at most first order (error ~ h^2; crediting taylor2's h^3
# lost up to 10 dB on the multistep solvers).
RESCALED_ORDER = 1
SMALL_CHANGE = 0.05


class Selection:
    """Held-out errors per candidate and group, and the choice made from them (shared across conditionings)."""

    def __init__(self, decay: Optional[float] = None):
        self.decay = decay  # None: HyCa (sum the warmup's errors, choose once); else online, errors decay
        self.errors: dict = {}  # name -> float64 tensor [groups]
        self.choice: Optional[list] = None  # per group: candidate name
        self.decayed_at: Optional[float] = None  # the time of the newest back-test (one decay per evaluation)
        self.gaps = (0.0, 0.0)  # decayed sum of the back-tests' distances, decayed count

    @property
    def online(self) -> bool:
        return self.decay is not None

    @property
    def settled(self) -> bool:
        """HyCa's choice is final (its other candidates are dropped)."""
        return not self.online and self.choice is not None

    def add(self, t: float, name: str, error: torch.Tensor, distance: float) -> None:
        """A back-test at t of a forecast made `distance` from its newest point."""
        if self.online and (self.decayed_at is None or not same_time(self.decayed_at, t)):
            self.errors = {n: e * self.decay for n, e in self.errors.items()}
            self.gaps = (self.gaps[0] * self.decay + distance, self.gaps[1] * self.decay + 1.0)
            self.decayed_at = t
        self.errors[name] = self.errors[name] + error if name in self.errors else error

    @property
    def gap(self) -> Optional[float]:
        """The back-tests' mean distance (None before the first)."""
        return self.gaps[0] / self.gaps[1] if self.gaps[1] > 0 else None


class HybridForecaster(Forecaster):
    def __init__(self, candidates: dict, groups: int, feature_dim: int = -1, selection: Optional[Selection] = None):
        self.candidates = dict(candidates)  # name -> Forecaster, simplest first (it wins ties)
        self.groups = groups
        self.feature_dim = feature_dim
        self.selection = selection or Selection()
        self.trials = 0
        self.times: list[float] = []

    def _group_errors(self, predicted: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Per group: squared forecast error, relative to the value's mean square when the selection is online
        (so that back-tests at evaluations of different magnitude weigh alike)."""
        squared = (predicted.float() - value.float()).pow(2)
        errors = torch.stack([p.mean() for p in torch.tensor_split(squared, self.groups, dim=self.feature_dim)])
        if self.selection.online:
            scale = torch.stack([p.float().pow(2).mean()
                                 for p in torch.tensor_split(value, self.groups, dim=self.feature_dim)])
            errors = errors / scale.clamp_min(1e-20)
        errors = errors.double()
        return errors if errors.is_meta else errors.cpu()  # meta: the memory report's accounting run

    def update(self, t: float, value: torch.Tensor) -> None:
        self.groups = max(1, min(self.groups, value.shape[self.feature_dim]))
        selection = self.selection
        held_out = not selection.settled and repeated_index(self.times, t) is None
        if held_out and all(f.ready for f in self.candidates.values()):
            for name, forecaster in self.candidates.items():
                selection.add(t, name, self._group_errors(forecaster.predict(t, value.device), value),
                              abs(t - self.times[0]))
            self.trials += 1
        for forecaster in self.candidates.values():
            forecaster.update(t, value)
        self.times = ([t] + self.times)[:4]
        if selection.online:  # the choice at the back-tests' distance (each fill chooses at its own)
            selection.choice = self._best()
        elif selection.choice is None and self.trials >= TRIALS:
            selection.choice = self._best()
        if selection.settled:
            self.candidates = {name: f for name, f in self.candidates.items() if name in selection.choice}

    @property
    def choice(self) -> Optional[list]:
        return self.selection.choice

    def _best(self, distance: Optional[float] = None) -> list:
        """Per group, the candidate with the least error; at `distance` from the newest point: the back-tested
        errors rescaled to it by each candidate's order (None: at the back-tests' own distance)."""
        names = list(self.candidates)
        if names[0] not in self.selection.errors:
            return [names[0]] * self.groups
        table = torch.stack([self.selection.errors[name] for name in names])
        if table.is_meta:  # the memory report's accounting run: no values to choose by
            return [names[0]] * self.groups
        selection = self.selection
        if distance is not None and selection.gap and distance < selection.gap:
            ratio = distance / selection.gap  # nearer than the back-tests (beyond them: their own ranking)
            scale = torch.tensor([ratio ** (2 * (min(RESCALED_ORDER, self.candidates[name].accuracy_order) + 1))
                                  for name in names], dtype=table.dtype, device=table.device)[:, None]
            # reuse's (the first candidate's) error per back-test is the value's relative squared change
            small = table[0] / selection.gaps[1] < SMALL_CHANGE
            table = torch.where(small, table * scale, table)
        return [names[i] for i in table.argmin(dim=0).tolist()]

    @property
    def ready(self) -> bool:
        return next(iter(self.candidates.values())).ready

    def predict(self, t: float, device: Optional[torch.device] = None) -> torch.Tensor:
        self._require()
        choice = self._best(abs(t - self.times[0])) if self.selection.online else (self.choice or self._best())
        forecasts = {name: self.candidates[name].predict(t, device) for name in set(choice)}
        if len(forecasts) == 1:
            return next(iter(forecasts.values()))
        parts = [torch.tensor_split(forecasts[name], self.groups, dim=self.feature_dim)[g]
                 for g, name in enumerate(choice)]
        return torch.cat(parts, dim=self.feature_dim)

    def latest(self, device: Optional[torch.device] = None, copy: bool = True) -> torch.Tensor:
        return next(iter(self.candidates.values())).latest(device, copy)

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in self.candidates.values())

    def lower_order(self) -> bool:
        return any([f.lower_order() for f in self.candidates.values()])

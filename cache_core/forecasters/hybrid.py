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

The choice is shared by the forecasters of one cached value across conditionings (errors summed):
with CFG, cond forecast and uncond reused would amplify their difference by the guidance scale.
"""
from __future__ import annotations

from typing import Optional

import torch

from .history import Forecaster, repeated_index, same_time

TRIALS = 3


class Selection:
    """Held-out errors per candidate and group, and the choice made from them (shared across conditionings)."""

    def __init__(self, decay: Optional[float] = None):
        self.decay = decay  # None: HyCa (sum the warmup's errors, choose once); else online, errors decay
        self.errors: dict = {}  # name -> float64 tensor [groups]
        self.choice: Optional[list] = None  # per group: candidate name
        self.trials = 0
        self.decayed_at: Optional[float] = None  # the time of the newest back-test (one decay per evaluation)

    @property
    def online(self) -> bool:
        return self.decay is not None

    @property
    def settled(self) -> bool:
        """HyCa's choice is final (its other candidates are dropped)."""
        return not self.online and self.choice is not None

    def add(self, t: float, name: str, error: torch.Tensor) -> None:
        if self.online and (self.decayed_at is None or not same_time(self.decayed_at, t)):
            self.errors = {n: e * self.decay for n, e in self.errors.items()}
            self.decayed_at = t
            self.trials += 1
        self.errors[name] = self.errors[name] + error if name in self.errors else error


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
                selection.add(t, name, self._group_errors(forecaster.predict(t, value.device), value))
            self.trials += 1
        for forecaster in self.candidates.values():
            forecaster.update(t, value)
        self.times = ([t] + self.times)[:4]
        if selection.online:
            selection.choice = self._best()
        elif selection.choice is None and self.trials >= TRIALS:
            selection.choice = self._best()
        if selection.settled:
            self.candidates = {name: f for name, f in self.candidates.items() if name in selection.choice}

    @property
    def choice(self) -> Optional[list]:
        return self.selection.choice

    def _best(self) -> list:
        names = list(self.candidates)
        if names[0] not in self.selection.errors:
            return [names[0]] * self.groups
        table = torch.stack([self.selection.errors[name] for name in names])
        if table.is_meta:  # the memory report's accounting run: no values to choose by
            return [names[0]] * self.groups
        return [names[i] for i in table.argmin(dim=0).tolist()]

    @property
    def ready(self) -> bool:
        return next(iter(self.candidates.values())).ready

    def predict(self, t: float, device: Optional[torch.device] = None) -> torch.Tensor:
        self._require()
        choice = self.choice or self._best()
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

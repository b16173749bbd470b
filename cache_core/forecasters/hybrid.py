"""HyCa: per group of feature dimensions, the forecaster that predicted that group best during warmup.

Every candidate sees every computed value. Before a candidate learns a new value it forecasts it
(a held-out point): the squared error is accumulated per feature group. After `TRIALS` held-out
points each group keeps its best candidate and the others are dropped (their memory with them).
The choice is shared by the forecasters of one cached value across conditionings (errors summed):
with CFG, cond forecast and uncond reused would amplify their difference by the guidance scale.
"""
from __future__ import annotations

from typing import Optional

import torch

from .history import Forecaster, repeated_index

TRIALS = 3


class Selection:
    """Held-out errors per candidate and group, and the choice made from them."""

    def __init__(self):
        self.errors: dict = {}  # name -> float64 tensor [groups]
        self.choice: Optional[list] = None  # per group: candidate name


class HybridForecaster(Forecaster):
    def __init__(self, candidates: dict, groups: int, feature_dim: int = -1, selection: Optional[Selection] = None):
        self.candidates = dict(candidates)  # name -> Forecaster, simplest first (it wins ties)
        self.groups = groups
        self.feature_dim = feature_dim
        self.selection = selection or Selection()
        self.trials = 0
        self.times: list[float] = []

    def _group_errors(self, predicted: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        squared = (predicted.float() - value.float()).pow(2)
        parts = torch.tensor_split(squared, self.groups, dim=self.feature_dim)
        errors = torch.stack([p.mean() for p in parts]).double()
        return errors if errors.is_meta else errors.cpu()  # meta: the memory report's accounting run

    def update(self, t: float, value: torch.Tensor) -> None:
        self.groups = max(1, min(self.groups, value.shape[self.feature_dim]))
        selection = self.selection
        held_out = selection.choice is None and repeated_index(self.times, t) is None
        if held_out and all(f.ready for f in self.candidates.values()):
            for name, forecaster in self.candidates.items():
                error = self._group_errors(forecaster.predict(t, value.device), value)
                selection.errors[name] = selection.errors[name] + error if name in selection.errors else error
            self.trials += 1
        for forecaster in self.candidates.values():
            forecaster.update(t, value)
        self.times = ([t] + self.times)[:4]
        if selection.choice is None and self.trials >= TRIALS:
            selection.choice = self._best()
        if selection.choice is not None:
            self.candidates = {name: f for name, f in self.candidates.items() if name in selection.choice}

    @property
    def choice(self) -> Optional[list]:
        return self.selection.choice

    def _best(self) -> list:
        names = list(self.candidates)
        if names[0] not in self.selection.errors:
            return [names[0]] * self.groups
        table = torch.stack([self.selection.errors[name] for name in names])
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

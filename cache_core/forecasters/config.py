"""The forecaster setting (frozen, primitives only, picklable) and the per-run object it builds."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..grid import TokenGrid
from .history import Forecaster
from .polynomial import TaylorForecaster

MAX_TAYLOR_ORDER = 4
# kind -> (lowest order, default order); kinds not listed take no order (0)
ORDERS = {"taylor": (0, 2)}
FORECASTER_KINDS = ("reuse", "taylor")


@dataclass(frozen=True)
class ForecasterConfig:
    """`kind` names the method; `order` applies to the kinds in ORDERS (None: the kind's default)."""

    kind: str = "reuse"
    order: Optional[int] = None

    def __post_init__(self):
        if self.kind not in FORECASTER_KINDS:
            raise ValueError(f"unknown forecaster '{self.kind}'; available: {', '.join(FORECASTER_KINDS)}")
        if self.order is None:
            object.__setattr__(self, "order", ORDERS[self.kind][1] if self.kind in ORDERS else 0)
        if self.kind in ORDERS:
            low = ORDERS[self.kind][0]
            if not low <= self.order <= MAX_TAYLOR_ORDER:
                raise ValueError(f"the '{self.kind}' forecaster's order must be between {low} and {MAX_TAYLOR_ORDER}, "
                                 f"got {self.order}")
        elif self.order != 0:
            raise ValueError(f"the '{self.kind}' forecaster has no order (set it to 0); choose 'taylor' for order 1-4")

    @property
    def is_reuse(self) -> bool:
        return self.kind == "reuse" or (self.kind == "taylor" and self.order == 0)

    @property
    def label(self) -> str:
        """The name the benchmark and the report use: reuse, taylor2, ..."""
        if self.is_reuse:
            return "reuse"
        return f"{self.kind}{self.order}" if self.kind in ORDERS else self.kind

    def new_state(self, store_device: Optional[torch.device] = None,
                  grid: Optional[TokenGrid] = None) -> Forecaster:
        """A fresh forecaster for one cached value; `grid` locates its image tokens (None: unknown)."""
        return TaylorForecaster(self.order, store_device)

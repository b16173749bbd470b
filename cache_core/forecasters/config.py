"""The forecaster setting (frozen, primitives only, picklable) and the per-run object it builds."""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import Optional

from ..grid import TokenGrid
from .frequency import FrequencyForecaster
from .history import Forecaster, Storage
from .hybrid import HybridForecaster, Selection
from .polynomial import AdamsBashforthForecaster, FoCaForecaster, HermiteForecaster, TaylorForecaster
from .spectrum import SpectrumForecaster

MAX_TAYLOR_ORDER = 4
# kind -> (lowest order, default order); the other kinds take no order (0)
ORDERS = {"taylor": (0, 2), "hicache": (1, 2), "ab": (1, 2)}
FORECASTER_KINDS = ("reuse", "taylor", "hicache", "ab", "foca", "spectrum", "freqca", "hyca", "auto")
GRID_KINDS = ("freqca",)  # kinds that need the image-token grid of the cached value
# HyCa's candidates, simplest first (the simplest wins a tie)
HYBRID_CANDIDATES = (("reuse", 0), ("taylor", 1), ("taylor", 2), ("hicache", 2), ("foca", 0))
# online selection (auto): the same candidates and Spectrum's global fit; older back-tests weigh AUTO_DECAY
# times less at each new one
AUTO_CANDIDATES = (*HYBRID_CANDIDATES, ("spectrum", 0))
AUTO_DECAY = 0.5


@dataclass(frozen=True)
class ForecasterConfig:
    """`kind` names the method; `order` applies to the kinds in ORDERS (None: the kind's default).

    contraction: HiCache's Hermite contraction (hicache, and freqca's high band); degree / ridge:
    Spectrum's Chebyshev degree and ridge penalty; cutoff: FreqCa's low-pass cutoff as a fraction
    of the grid's highest frequency; groups: the number of feature-dimension groups
    that hyca and auto each choose a candidate for.
    """

    kind: str = "reuse"
    order: Optional[int] = None
    contraction: float = 0.6
    degree: int = 4
    ridge: float = 0.1
    cutoff: float = 0.1
    groups: int = 8

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
            raise ValueError(f"the '{self.kind}' forecaster has no order (set it to 0); orders apply to "
                             f"{', '.join(ORDERS)}")
        if not 0.0 < self.contraction <= 1.0:
            raise ValueError(f"contraction must be in (0, 1], got {self.contraction}")
        if not 1 <= self.degree <= 12:
            raise ValueError(f"the Chebyshev degree must be between 1 and 12, got {self.degree}")
        if self.ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {self.ridge}")
        if not 0.0 < self.cutoff < 1.0:
            raise ValueError(f"cutoff must be in (0, 1) (a fraction of the highest frequency), got {self.cutoff}")
        if self.groups < 1:
            raise ValueError(f"groups must be >= 1, got {self.groups}")

    @property
    def is_reuse(self) -> bool:
        """Fills with the last computed value (taylor order 0 and ab order 1 are reuse)."""
        return self.kind == "reuse" or (self.kind in ("taylor", "ab") and self.order == ORDERS[self.kind][0])

    @property
    def needs_grid(self) -> bool:
        return self.kind in GRID_KINDS

    @property
    def label(self) -> str:
        """The name the benchmark and the report use: reuse, taylor2, ab3, hicache, spectrum, ..."""
        if self.kind == "reuse" or (self.kind == "taylor" and self.order == 0):
            return "reuse"
        if self.kind == "hicache":
            return "hicache" if self.order == ORDERS["hicache"][1] else f"hicache{self.order}"
        return f"{self.kind}{self.order}" if self.kind in ORDERS else self.kind

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ForecasterConfig":
        return cls(**data)

    def new_state(self, storage: Optional[Storage] = None, grid: Optional[TokenGrid] = None,
                  shared: Optional[dict] = None) -> Forecaster:
        """A fresh forecaster for one cached value of one conditioning; `grid` locates its image tokens (None:
        unknown); `storage` where and in which dtype it keeps values (None: as computed); `shared` is one dict
        per cached value, common to its forecasters of every conditioning."""
        kind = self.kind
        if kind in ("reuse", "taylor"):
            return TaylorForecaster(self.order, storage)
        if kind == "hicache":
            return HermiteForecaster(self.order, self.contraction, storage)
        if kind == "ab":
            return AdamsBashforthForecaster(self.order, storage)
        if kind == "foca":
            return FoCaForecaster(storage)
        if kind == "spectrum":
            return SpectrumForecaster(self.degree, self.ridge, storage)
        if kind == "freqca":
            return FrequencyForecaster(self.cutoff, self.contraction, grid, storage)
        online = kind == "auto"
        candidates = {ForecasterConfig(k, o).label: dataclasses.replace(self, kind=k, order=o).new_state(storage, grid)
                      for k, o in (AUTO_CANDIDATES if online else HYBRID_CANDIDATES)}
        selection = (shared if shared is not None else {}).setdefault(kind, Selection(AUTO_DECAY if online else None))
        return HybridForecaster(candidates, self.groups, grid.feature_dim if grid is not None else -1, selection)

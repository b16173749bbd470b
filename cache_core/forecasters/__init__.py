"""How a skipped computation is filled: forecasters over a site's history of computed values."""
from .config import FORECASTER_KINDS, MAX_TAYLOR_ORDER, ORDERS, ForecasterConfig
from .frequency import low_pass, split_bands
from .history import Forecaster
from .polynomial import TaylorForecaster

__all__ = ["FORECASTER_KINDS", "MAX_TAYLOR_ORDER", "ORDERS", "Forecaster", "ForecasterConfig", "TaylorForecaster",
           "low_pass", "split_bands"]

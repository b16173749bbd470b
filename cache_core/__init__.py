"""The feature-cache engine: pure torch, no ComfyUI import (tested on plain tensors)."""
from .blocks import BlockRunner
from .engine import CacheConfig, CacheRun
from .forecasters import FORECASTER_KINDS, MAX_TAYLOR_ORDER, ORDERS, Forecaster, ForecasterConfig, TaylorForecaster
from .grid import TokenGrid
from .policies import POLICIES, EasyCache, FirstBlock, FixedInterval, Policy, TeaCache, make_policy
from .sites import SITE_KINDS, Site
from .tokens import TOKEN_SELECTIONS, TokenConfig, TokenLayout
from .trace import COMPUTED, FORECAST, PARTIAL, REUSED, Trace, render_map

__all__ = [
    "BlockRunner", "CacheConfig", "CacheRun", "FORECASTER_KINDS", "MAX_TAYLOR_ORDER", "ORDERS", "Forecaster",
    "ForecasterConfig", "TaylorForecaster", "TokenGrid", "POLICIES", "EasyCache", "FirstBlock", "FixedInterval",
    "Policy", "TeaCache", "make_policy", "SITE_KINDS", "Site", "TOKEN_SELECTIONS", "TokenConfig", "TokenLayout",
    "COMPUTED", "FORECAST", "PARTIAL", "REUSED", "Trace", "render_map",
]

"""The feature-cache engine: pure torch, no ComfyUI import (tested on plain tensors)."""
from .blocks import BlockRunner
from .cfg import CfgBranchCache
from .engine import CacheConfig, CacheRun
from .forecasters import FORECASTER_KINDS, MAX_TAYLOR_ORDER, ORDERS, Forecaster, ForecasterConfig, TaylorForecaster
from .grid import TokenGrid
from .policies import (POLICIES, Delta, EasyCache, FirstBlock, FixedInterval, Foresight, Policy, SpeCa, TeaCache,
                       make_policy)
from .sites import SITE_KINDS, Site
from .tokens import TOKEN_SELECTIONS, TokenConfig
from .trace import COMPUTED, FORECAST, REJECTED, REUSED, Trace, render_map

__all__ = [
    "BlockRunner", "CfgBranchCache", "CacheConfig", "CacheRun", "FORECASTER_KINDS", "MAX_TAYLOR_ORDER", "ORDERS",
    "Forecaster", "ForecasterConfig", "TaylorForecaster", "TokenGrid", "POLICIES", "Delta", "EasyCache", "FirstBlock",
    "FixedInterval", "Foresight", "Policy", "SpeCa", "TeaCache", "make_policy", "SITE_KINDS", "Site",
    "TOKEN_SELECTIONS", "TokenConfig", "COMPUTED", "FORECAST", "REJECTED", "REUSED", "Trace", "render_map",
]

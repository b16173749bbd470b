"""The feature-cache engine: pure torch, no ComfyUI import (tested on plain tensors)."""
from .blocks import BlockRunner
from .cfg import CfgBranchCache
from .budget import BudgetController, budget_for_speed
from .engine import CACHE_DTYPES, CacheConfig, CacheRun
from .forecasters import FORECASTER_KINDS, MAX_TAYLOR_ORDER, ORDERS, Forecaster, ForecasterConfig, TaylorForecaster
from .grid import TokenGrid
from .policies import (POLICIES, Delta, DiCache, EasyCache, FirstBlock, FixedInterval, Foresight, MagCache, Policy,
                       SpeCa, TeaCache)
from .recommended import (DEFAULT_METHOD, RECOMMENDED_FORECASTER, RECOMMENDED_PROBE_BLOCKS, RECOMMENDED_SITE,
                          make_policy)
from .sites import SITE_KINDS, Site
from .tokens import TOKEN_SELECTIONS, AttentionLayout, TokenConfig, TokenLayout
from .trace import COMPUTED, FORECAST, PARTIAL, REJECTED, REUSED, Trace

__all__ = [
    "BlockRunner", "CfgBranchCache", "BudgetController", "budget_for_speed", "CACHE_DTYPES", "CacheConfig",
    "CacheRun",
    "FORECASTER_KINDS",
    "MAX_TAYLOR_ORDER", "ORDERS", "Forecaster", "ForecasterConfig", "TaylorForecaster", "TokenGrid", "POLICIES",
    "Delta", "DiCache", "EasyCache", "FirstBlock", "FixedInterval", "Foresight", "MagCache", "Policy", "SpeCa",
    "TeaCache", "DEFAULT_METHOD",
    "RECOMMENDED_FORECASTER", "RECOMMENDED_PROBE_BLOCKS", "RECOMMENDED_SITE", "make_policy", "SITE_KINDS", "Site",
    "TOKEN_SELECTIONS", "AttentionLayout", "TokenConfig", "TokenLayout", "COMPUTED", "FORECAST", "PARTIAL", "REJECTED", "REUSED",
    "Trace",
]

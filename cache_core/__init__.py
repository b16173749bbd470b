"""The feature-cache engine: pure torch, no ComfyUI import (tested on plain tensors)."""
from .blocks import BlockRunner
from .engine import CacheConfig, CacheRun, chunk
from .forecasters import FORECASTER_KINDS, MAX_TAYLOR_ORDER, ForecasterConfig, TaylorForecaster
from .policies import (INPUT, MODULATED_INPUT, NO_INDICATOR, POLICIES, PROBE_RESIDUAL, EasyCache, FirstBlock,
                       FixedInterval, Policy, TeaCache, make_policy)
from .sites import BLOCKS, BlockPlan, CACHED, CORRECTOR, MODEL, PROBE, SITE_KINDS, SPAN, Site
from .tokens import TOKEN_SELECTIONS, TokenConfig
from .trace import COMPUTED, FORECAST, PARTIAL, REUSED, Trace, render_map

"""The recommended combination: what the nodes do when the user only moves `speed`.

Chosen from the frontier benchmark across every bundled case and schedule (README, "Recommended
default", has the table): one combination for every model, so the slider behaves the same everywhere.
"""
from __future__ import annotations

from .forecasters import ForecasterConfig
from .policies import POLICIES, Policy

DEFAULT_METHOD = "default"
RECOMMENDED_POLICY = "planned"
RECOMMENDED_FORECASTER = ForecasterConfig("auto")
RECOMMENDED_SITE = "model"
RECOMMENDED_PROBE_BLOCKS = 1


def make_policy(method: str, **settings) -> Policy:
    """A policy by name; "default" is the recommended one."""
    if method == DEFAULT_METHOD:
        method = RECOMMENDED_POLICY
    if method not in POLICIES:
        raise ValueError(f"unknown cache policy '{method}'; available: {DEFAULT_METHOD}, {', '.join(POLICIES)}")
    return POLICIES[method](**settings)

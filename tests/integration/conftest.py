"""Integration fixtures: the real ComfyUI host, booted once, with the product and fixture packs loaded.

In CI (CI=true) a missing host is an error, never a skip.
"""
import os

import pytest

from benchmarks import fixtures, host as host_module


@pytest.fixture(scope="session")
def host():
    return host_module.get_host()


@pytest.fixture(scope="session")
def paths(host, tmp_path_factory):
    return fixtures.ensure_fixtures(str(tmp_path_factory.mktemp("fixtures")))


@pytest.fixture(scope="session")
def run_graph(host):
    """Execute a graph; return (captured latent, Cache Map report or None)."""
    def run(graph):
        outputs = host.execute(graph)
        report = None
        if "cache_map" in outputs:
            report = outputs["cache_map"]["feature_cache_report"][0]
        return host.captured(graph["capture"]["inputs"]["key"]), report
    return run


def pytest_report_header(config):
    return f"ComfyUI host: {os.environ.get('COMFYUI_PATH') or 'from .comfyui_path / ~/ComfyUI'}"

"""Integration fixtures: the real ComfyUI host, booted once, with the product and fixture packs loaded.

In CI (CI=true) a missing host is an error, never a skip.
"""
import os
import sys

import pytest

from benchmarks import fixtures, host as host_module
from benchmarks.server import running_server


@pytest.fixture(scope="session")
def host():
    import torch
    torch.set_num_threads(1)  # tiny models: threading overhead dominates, and CI has 2 cores
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


@pytest.fixture(scope="session")
def product(host):
    """Modules of the product pack as the host's loader imported them (package name = the folder's)."""
    def find(name):
        relative = os.path.join(*name.split("."))
        targets = {os.path.realpath(os.path.join(host_module.REPO_ROOT, relative)) + ".py",
                   os.path.realpath(os.path.join(host_module.REPO_ROOT, relative, "__init__.py"))}
        # a test helper may also have imported the file as a top-level module (`cache_core`): a second copy
        # whose classes are not the pack's, so the host-loaded one (a name under the pack's package) comes first
        found = sorted((m for m in list(sys.modules.values())
                        if getattr(m, "__file__", None) and os.path.realpath(m.__file__) in targets),
                       key=lambda m: m.__name__ == name)
        if not found:
            raise RuntimeError(f"product module {name} is not loaded")
        return found[0]
    return find


@pytest.fixture(scope="session")
def models(host, paths):
    """ModelPatchers of the tiny fixtures as the host's loaders build them, with their label file and latent shape."""
    import nodes
    fixture_flux = host.node_classes["FCFixtureFluxLoader"]
    wan = nodes.UNETLoader().load_unet(paths["wan_name"], "default")[0]
    flux = fixture_flux.execute(paths["flux"]).args[0]
    return {"wan": (wan, paths["wan_labels"], (1, 16, 1, 8, 8)),
            "flux": (flux, paths["flux_labels"], (1, 16, 8, 8))}


@pytest.fixture(scope="module")
def server(tmp_path_factory, paths):
    """A real ComfyUI server process (main.py) for the module, as a RunningServer.

    Its base directory is a temporary folder whose custom_nodes/ holds links to this checkout
    (the product) and to the fixture pack, so nothing is copied or installed into the host."""
    base = tmp_path_factory.mktemp("server")
    with running_server(str(base), {paths["wan_name"]: paths["wan"]}) as running:
        yield running

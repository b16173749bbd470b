"""Integration fixtures: the real ComfyUI host, booted once, with the product and fixture packs loaded.

In CI (CI=true) a missing host is an error, never a skip.
"""
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from benchmarks import fixtures, host as host_module

PACK_NAME = "ComfyUI-FeatureCache"


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
        for module in list(sys.modules.values()):
            file = getattr(module, "__file__", None)
            if file and os.path.realpath(file) in targets:
                return module
        raise RuntimeError(f"product module {name} is not loaded")
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


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url, timeout=10):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.status, response.read()


class ComfyServer:
    def __init__(self, url, base, process):
        self.url, self.base, self.process = url, base, process

    def get(self, path, timeout=10):
        """(status, body) of GET url + path."""
        return http_get(self.url + path, timeout)


@pytest.fixture(scope="module")
def server(tmp_path_factory, paths):
    """A real ComfyUI server process (main.py) for the module, as a ComfyServer.

    Its base directory is a temporary folder whose custom_nodes/ holds links to this checkout
    (the product) and to the fixture pack, so nothing is copied or installed into the host."""
    base = tmp_path_factory.mktemp("server")
    (base / "custom_nodes").mkdir()
    os.symlink(host_module.REPO_ROOT, base / "custom_nodes" / PACK_NAME)
    os.symlink(host_module.FIXTURE_PACK, base / "custom_nodes" / "fc_fixtures")
    (base / "models" / "diffusion_models").mkdir(parents=True)
    shutil.copy(paths["wan"], base / "models" / "diffusion_models" / paths["wan_name"])
    port = _free_port()
    log = open(base / "server.log", "w")
    process = subprocess.Popen(
        [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
         "--base-directory", str(base), "--disable-auto-launch"],
        cwd=host_module.comfyui_path(), stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                http_get(url + "/object_info/KSampler", timeout=2)
                break
            except OSError:
                if process.poll() is not None or time.time() > deadline:
                    raise RuntimeError("ComfyUI server did not start:\n" + (base / "server.log").read_text()[-4000:])
                time.sleep(0.5)
        yield ComfyServer(url, base, process)
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()

"""The real ComfyUI server as a user runs it (main.py --cpu --listen ...), with this pack and the fixture pack.

The server's base directory is a folder whose custom_nodes/ holds links to this checkout and to the
fixture pack, so nothing is copied or installed into the host. Used by the server and browser tests.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

from benchmarks.host import FIXTURE_PACK, REPO_ROOT, comfyui_path

PACK_NAME = "ComfyUI-FeatureCache"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, timeout: float = 10):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.status, response.read()


@dataclasses.dataclass
class RunningServer:
    url: str
    base: str
    process: subprocess.Popen

    def get(self, path: str, timeout: float = 10):
        """(status, body) of GET url + path."""
        return get(self.url + path, timeout)


@contextlib.contextmanager
def running_server(base: str, diffusion_models: dict | None = None, settings: dict | None = None):
    """Starts the host on a free port with `base` as its base directory; yields it as a RunningServer.

    `diffusion_models`: {file name: path} linked into models/diffusion_models; `settings`: the
    frontend's user settings (comfy.settings.json of the default user)."""
    os.makedirs(os.path.join(base, "custom_nodes"), exist_ok=True)
    for name, target in ((PACK_NAME, REPO_ROOT), ("fc_fixtures", FIXTURE_PACK)):
        link = os.path.join(base, "custom_nodes", name)
        if not os.path.lexists(link):
            os.symlink(target, link)
    models = os.path.join(base, "models", "diffusion_models")
    os.makedirs(models, exist_ok=True)
    for name, path in (diffusion_models or {}).items():
        if not os.path.lexists(os.path.join(models, name)):
            os.symlink(os.path.abspath(path), os.path.join(models, name))
    if settings is not None:
        os.makedirs(os.path.join(base, "user", "default"), exist_ok=True)
        with open(os.path.join(base, "user", "default", "comfy.settings.json"), "w") as f:
            json.dump(settings, f)
    port = free_port()
    log_path = os.path.join(base, "server.log")
    log = open(log_path, "w")
    process = subprocess.Popen(
        [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
         "--base-directory", str(base), "--disable-auto-launch"],
        cwd=comfyui_path(), stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                get(url + "/object_info/KSampler", timeout=2)
                break
            except OSError:
                if process.poll() is not None or time.time() > deadline:
                    with open(log_path) as f:
                        raise RuntimeError("ComfyUI server did not start:\n" + f.read()[-4000:])
                time.sleep(0.5)
        yield RunningServer(url, base, process)
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()

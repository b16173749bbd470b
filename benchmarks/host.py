"""Headless, in-process ComfyUI host for integration tests, the demo and benchmarks.

Running graphs through the host's own validator and executor (not by calling node classes
directly) is what makes the tests meaningful: the product must work as ComfyUI loads and runs it.
The host is booted once per process (its node registry and model management are global state).
"""
from __future__ import annotations

import asyncio
import atexit
import gc
import inspect
import logging
import os
import shutil
import sys
import tempfile
import uuid

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE_PACK = os.path.join(REPO_ROOT, "benchmarks", "fixture_nodes")
DEFAULT_PACKS = (REPO_ROOT, FIXTURE_PACK)

_HOST: Host | None = None


def comfyui_path() -> str:
    """The host checkout: $COMFYUI_PATH, else the one `make setup` recorded, else ~/ComfyUI."""
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        recorded = os.path.join(REPO_ROOT, ".comfyui_path")
        if os.path.isfile(recorded):
            with open(recorded) as f:
                path = f.read().strip()
    if not path:
        path = os.path.join(os.path.expanduser("~"), "ComfyUI")
    path = os.path.abspath(path)
    if not os.path.isfile(os.path.join(path, "main.py")):
        raise RuntimeError(f"ComfyUI host not found at {path}; run make setup or set COMFYUI_PATH")
    return path


class _ServerStub:
    """Stands in for server.PromptServer: the executor and nodes talk to clients through it.

    Every send_sync is recorded so tests can check what a browser would have received.
    """

    def __init__(self):
        from aiohttp import web

        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata = {}
        self.routes = web.RouteTableDef()  # packs may register HTTP routes at import time
        self.events: list[tuple[str, object, str | None]] = []

    def send_sync(self, event, data, sid=None):
        self.events.append((event, data, sid))

    def send_progress_text(self, text, node_id, sid=None):
        self.send_sync("progress_text", {"node": node_id, "text": text}, sid)

    def queue_updated(self):
        pass


class LogCollector(logging.Handler):
    """Keeps the log lines emitted meanwhile: the host reports pack-load failures and its cache nodes' summaries only there."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


class Host:
    """A booted host. Use boot() / get_host(), not the constructor."""

    def __init__(self, output_dir: str):
        # The host's utils/ package must be imported before nodes puts comfy/ (holding a utils.py)
        # first on sys.path, as main.py does; server.py needs utils.install_util.
        import utils  # noqa: F401
        import comfy.model_management
        import comfy.utils
        import execution
        import folder_paths
        import nodes
        import server
        from comfy_execution.progress import get_progress_state
        from comfy_execution.utils import get_executing_context

        self._execution = execution
        self._nodes = nodes
        self._folder_paths = folder_paths
        self.output_dir = output_dir
        for sub, setter in (("output", folder_paths.set_output_directory),
                            ("temp", folder_paths.set_temp_directory),
                            ("input", folder_paths.set_input_directory),
                            ("user", folder_paths.set_user_directory)):
            os.makedirs(os.path.join(output_dir, sub), exist_ok=True)
            setter(os.path.join(output_dir, sub))

        self._server = _ServerStub()
        # Nodes reach the browser through PromptServer.instance; headless, that is the stub.
        server.PromptServer.instance = self._server

        def progress_hook(value, total, preview_image, prompt_id=None, node_id=None):
            # Same event flow as the host's main.hijack_progress, minus previews.
            context = get_executing_context()
            if context is not None:
                prompt_id = prompt_id or context.prompt_id
                node_id = node_id or context.node_id
            comfy.model_management.throw_exception_if_processing_interrupted()
            prompt_id = prompt_id or self._server.last_prompt_id
            node_id = node_id or self._server.last_node_id
            get_progress_state().update_progress(node_id, value, total, None)
            self._server.send_sync("progress", {"value": value, "max": total, "prompt_id": prompt_id,
                                                "node": node_id}, self._server.client_id)

        comfy.utils.set_progress_bar_global_hook(progress_hook)
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
        self.loaded_packs: list[str] = []
        self._fixture_module = None

    @property
    def events(self) -> list[tuple[str, object, str | None]]:
        """(event, data, client_id) sent during the last execute()."""
        return self._server.events

    @property
    def node_classes(self) -> dict:
        return self._nodes.NODE_CLASS_MAPPINGS

    def load_pack(self, path: str) -> None:
        """Loads a custom node pack with the host's own loader; raises if it does not load."""
        path = os.path.abspath(path)
        if path in self.loaded_packs:
            return
        if not os.path.isfile(os.path.join(path, "__init__.py")):
            raise RuntimeError(f"custom node pack {path} has no __init__.py")
        collector = LogCollector()
        root = logging.getLogger()
        root.addHandler(collector)
        try:
            ok = asyncio.run(self._nodes.load_custom_node(path))
        finally:
            root.removeHandler(collector)
        if not ok:
            details = "\n".join(collector.lines[-20:])
            raise RuntimeError(f"custom node pack {path} failed to load:\n{details}")
        self.loaded_packs.append(path)

    def add_model_dir(self, path: str, kind: str = "diffusion_models") -> None:
        """Registers a folder so loader nodes (UNETLoader for diffusion_models) list its files."""
        self._folder_paths.add_model_folder_path(kind, os.path.abspath(path))

    def execute(self, prompt: dict, client_id: str | None = None) -> dict:
        """Validates and runs an API-format prompt; returns the history "outputs" (ui per node id).

        A fresh executor per call means no node output is reused: every node re-runs.
        As in the host, executing/executed events are only sent when a client_id is given.
        Raises ValueError if the prompt is invalid and RuntimeError if a node fails.
        """
        execution = self._execution
        prompt_id = str(uuid.uuid4())
        valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
        if not valid or node_errors:
            raise ValueError(_format_validation_error(error, node_errors))

        # v0.3.64 takes cache_size; v0.8 takes cache_args and reads its "ram" key after every node.
        kwargs = {}
        if "cache_args" in inspect.signature(execution.PromptExecutor).parameters:
            kwargs["cache_args"] = {"lru": 0, "ram": 0.0}
        executor = execution.PromptExecutor(self._server, cache_type=execution.CacheType.CLASSIC, **kwargs)
        self._server.events = []
        self._server.last_prompt_id = prompt_id
        extra_data = {} if client_id is None else {"client_id": client_id}
        executor.execute(prompt, prompt_id, extra_data, outputs)
        status, result = dict(executor.status_messages), executor.history_result["outputs"]
        # The run's model (loaded afresh: no output is reused) and patchers sit in reference cycles until Python's
        # cyclic GC happens to run: without this, RSS grows by a model per run (+600 MB per run on the real-dims
        # slice, 17 GB after a few dozen). The host's prompt worker collects after prompts too.
        del executor
        gc.collect()
        if "execution_success" not in status:
            raise RuntimeError(_format_execution_error(status))
        return result

    def captured(self, key: str):
        """The latent tensor that the FCFixtureCapture node stored under `key`."""
        if self._fixture_module is None:  # found once: resolving every module's path takes 0.2 s
            init = os.path.realpath(os.path.join(FIXTURE_PACK, "__init__.py"))
            self._fixture_module = next((m for m in list(sys.modules.values()) if getattr(m, "__file__", None)
                                         and os.path.realpath(m.__file__) == init), None)
            if self._fixture_module is None:
                raise RuntimeError("the fixture node pack is not loaded (boot with benchmarks/fixture_nodes)")
        return self._fixture_module.CAPTURED[key]


def _format_validation_error(error, node_errors) -> str:
    lines = []
    if error:
        lines.append(": ".join(str(part) for part in (error.get("message"), error.get("details")) if part))
    for node_id, info in (node_errors or {}).items():
        for reason in info["errors"]:
            lines.append(f"node {node_id} ({info['class_type']}): {reason['message']}: {reason['details']}")
    return "invalid prompt:\n" + "\n".join(lines)


def _format_execution_error(status: dict) -> str:
    if "execution_error" in status:
        e = status["execution_error"]
        return (f"node {e['node_id']} ({e['node_type']}) failed: {e['exception_type']}: "
                f"{e['exception_message']}\n" + "".join(e["traceback"]))
    if "execution_interrupted" in status:
        e = status["execution_interrupted"]
        return f"execution interrupted at node {e['node_id']} ({e['node_type']})"
    return "execution did not finish"


PACK_LOGGER = "FeatureCache"


class _PackRecords(logging.Filter):
    def filter(self, record):
        return record.name == PACK_LOGGER or record.name.startswith(PACK_LOGGER + ".")


def route_host_logs(path: str) -> None:
    """The host's log goes to `path`; only the pack's own warnings reach stderr.

    Booted headless, the host logs expected noise (torchaudio missing, two audio node files that fail
    to import) that would drown the demo's and benchmark's results. Installed before the host is
    imported, so its root-logger calls find a handler and never fall back to logging.basicConfig."""
    root = logging.getLogger()
    to_file = logging.FileHandler(path, encoding="utf-8")
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    to_stderr = logging.StreamHandler(sys.stderr)
    to_stderr.setLevel(logging.WARNING)
    to_stderr.addFilter(_PackRecords())
    to_stderr.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(to_file)
    root.addHandler(to_stderr)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)


def boot(output_dir: str | None = None, packs=None, cpu: bool = True) -> Host:
    """Boots the host once per process and loads the given packs (default: product + fixtures).

    Later calls return the same Host and load any requested pack that is not loaded yet;
    output_dir and cpu only matter on the first call. output_dir defaults to a temporary folder
    removed at exit; cpu=False lets the host pick its accelerator (GPU benchmarks).
    """
    global _HOST
    booting = _HOST is None
    if booting:
        if output_dir is None:
            output_dir = tempfile.mkdtemp(prefix="fc-host-")
            atexit.register(shutil.rmtree, output_dir, True)
        os.makedirs(output_dir, exist_ok=True)
        route_host_logs(os.path.join(output_dir, "host.log"))
        host_path = comfyui_path()
        # First, so the host's top-level modules (nodes, utils, ...) win over same-named ones,
        # e.g. the product's nodes/ package when the repo root is the working directory.
        if host_path in sys.path:
            sys.path.remove(host_path)
        sys.path.insert(0, host_path)
        import comfy.cli_args  # parses [] (not sys.argv) unless comfy.options enabled parsing

        if "comfy.model_management" in sys.modules:
            raise RuntimeError("comfy.model_management was imported before boot(); its device settings are fixed")
        args = comfy.cli_args.args  # read when comfy.model_management is first imported
        args.cpu = cpu
        args.deterministic = True
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what main.py sets for --deterministic
        _HOST = Host(os.path.abspath(output_dir))
        import comfy.utils
        comfy.utils.set_progress_bar_enabled(False)  # the sampler's tqdm bars would interleave with results
    loaded = len(_HOST.loaded_packs)
    for pack in DEFAULT_PACKS if packs is None else packs:
        _HOST.load_pack(pack)
    if booting or len(_HOST.loaded_packs) > loaded:
        # Each execute() drops the previous run's models, and the host then runs a full
        # gc.collect() that would walk the ~500k objects of the booted host (0.3 s+ on CPU).
        # Those live for the whole process, so take them out of collection.
        gc.collect()
        gc.freeze()
    return _HOST


atexit.register(gc.unfreeze)  # lets interpreter shutdown release them (native bindings report leaks)


def get_host() -> Host:
    """The process-wide host with the product and fixture packs loaded."""
    return boot()

"""Live feedback to the browser: the cache map so far, sent after every sampler step.

The frontend extension (web/feature_cache.js) draws it on the Apply Feature Cache node.
"""
from __future__ import annotations

from typing import Callable, Optional

from ..cache_core import CacheRun

PROGRESS_EVENT = "feature_cache.progress"
_LETTERS = {None: "-", "computed": "C", "reused": "R", "forecast": "F", "partial": "P", "rejected": "X"}


def _server():
    try:
        import server
        return server.PromptServer.instance
    except (ImportError, AttributeError):  # no server: a script using ComfyUI as a library
        return None


def snapshot(run: CacheRun, node_id: str, step: int, total: int, done: bool = False) -> dict:
    """Compact state of the run: one string per evaluation, one letter per row (C/R/F/P/X/-)."""
    return {
        "node": node_id,
        "step": step,
        "total": total,
        "done": done,
        "rows": run.trace.rows,
        "columns": ["".join(_LETTERS[a] for a in ev.actions) for ev in run.trace.evaluations],
        "compute_fraction": run.trace.compute_fraction(),
    }


def send(run: CacheRun, node_id: Optional[str], step: int, total: int, done: bool = False) -> None:
    server = _server()
    if server is None or node_id is None:
        return
    server.send_sync(PROGRESS_EVENT, snapshot(run, node_id, step, total, done), getattr(server, "client_id", None))


def with_progress(callback: Optional[Callable], run: CacheRun, node_id: Optional[str]) -> Optional[Callable]:
    """Wrap the sampler's step callback so each step also reports the cache map."""
    if node_id is None:
        return callback

    def step_callback(step, x0, x, total_steps):
        send(run, node_id, step + 1, total_steps)
        if callback is not None:
            return callback(step, x0, x, total_steps)
    return step_callback

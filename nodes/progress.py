"""Live feedback to the browser: the cache map of the running sampler, drawn by web/feature_cache.js.

Events go only to the client that queued the prompt, keyed by the Apply Feature Cache node's id
(subgraph ids such as "12:7:5" included). They are incremental (each event carries the evaluations
not sent yet), throttled (at most `MAX_EVENTS_PER_S` events a second, at most `MAX_CELLS` cells each),
and the run ends with one event holding the full map, so a page opened mid-run still ends complete.

Cells are coded one character each: the index of the action in `legend()` ("-": not run, e.g. a
block the site does not cache in a whole-model map).
"""
from __future__ import annotations

import math
import time
import uuid
from typing import Callable, Optional

from ..cache_core import CacheRun
from ..cache_core.trace import ACTIONS

PROGRESS_EVENT = "feature_cache.progress"
MAX_EVENTS_PER_S = 4.0
MAX_CELLS = 65536  # a 1000-block video map sends at most 65 columns in one event
NOT_RUN = "-"

# Known actions: label and colour (shared by the widget and the saved figure). Actions the trace
# gains later get a colour from FALLBACK_COLORS, so they are never drawn blank.
ACTION_STYLE = {
    "computed": ("computed", "#dc463c"),
    "reused": ("reused", "#4682dc"),
    "forecast": ("forecast", "#50be6e"),
    "partial": ("partial (tokens)", "#e6b43c"),
    "rejected": ("verified-rejected", "#b45ad2"),
}
FALLBACK_COLORS = ("#3cc8c8", "#e67850", "#a0a0a0", "#c8a0ff", "#8cdc3c")
NOT_RUN_COLOR = "#282828"
_CODES = "0123456789abcdefghijklmnopqrstuvwxyz"


def legend() -> list[dict]:
    """Every action the map can show, in code order: the known ones first, then any other trace action."""
    names = list(ACTION_STYLE) + [a for a in ACTIONS if a not in ACTION_STYLE]
    entries = []
    for i, name in enumerate(names):
        label, color = ACTION_STYLE.get(name, (name, FALLBACK_COLORS[(i - len(ACTION_STYLE)) % len(FALLBACK_COLORS)]))
        entries.append({"action": name, "label": label, "color": color, "code": _CODES[i]})
    return entries


_CODE_OF = {entry["action"]: entry["code"] for entry in legend()}


def encode_column(actions: list) -> str:
    return "".join(NOT_RUN if a is None else _CODE_OF[a] for a in actions)


def _finite(value):
    """JSON for the browser: inf / nan (an ideal speedup with nothing computed) become null."""
    return value if not isinstance(value, float) or math.isfinite(value) else None


def _evaluation(step, sigma, indicator, decision) -> list:
    return [step, _finite(sigma), _finite(indicator), decision]


def compact(report: dict) -> dict:
    """A finished run's report as the widget's full map state (what the last progress event carries)."""
    trace = report["trace"]
    return {
        "header": _header(trace["rows"], report),
        "start": 0,
        "columns": [encode_column(e["actions"]) for e in trace["evaluations"]],
        "evaluations": [_evaluation(e["step"], e["sigma"], e["indicator"], e["decision"])
                        for e in trace["evaluations"]],
        "summary": {key: _finite(report.get(key)) for key in (
            "compute_fraction", "ideal_speedup", "elapsed_s", "peak_cache_bytes", "evaluations",
            "evaluations_computed")},
    }


def _header(rows: list, description: dict) -> dict:
    return {"rows": list(rows), "legend": legend(), "not_run_color": NOT_RUN_COLOR,
            **{key: description.get(key) for key in ("method", "threshold", "budget", "forecaster", "site")}}


def _server():
    try:
        import server
        return server.PromptServer.instance
    except (ImportError, AttributeError):  # no server: a script using ComfyUI as a library
        return None


class ProgressStream:
    """One run's map, streamed to the client that queued the prompt."""

    def __init__(self, run: CacheRun, node_id: Optional[str], server=None, clock: Callable[[], float] = time.monotonic,
                 max_events_per_s: float = MAX_EVENTS_PER_S, max_cells: int = MAX_CELLS):
        self.run = run
        self.node_id = node_id
        self.server = server
        # The host sets client_id for the prompt it is executing; read now, at the start of sampling.
        self.client_id = getattr(server, "client_id", None)
        self.clock = clock
        self.interval = 1.0 / max_events_per_s
        self.max_cells = max_cells
        self.run_id = uuid.uuid4().hex[:12]
        self.started = clock()
        self.sent = 0  # evaluations already sent
        self.last_sent = None

    @property
    def enabled(self) -> bool:
        return self.server is not None and self.node_id is not None and self.client_id is not None

    def step(self, step: int, total: int) -> None:
        """After a sampler step: send the new evaluations if the throttle allows."""
        if not self.enabled:
            return
        now = self.clock()
        if self.last_sent is not None and now - self.last_sent < self.interval:
            return
        evaluations = self.run.trace.evaluations
        rows = max(1, len(self.run.trace.rows))
        count = min(len(evaluations) - self.sent, max(1, self.max_cells // rows))
        payload = self._message(step, total, self.sent, evaluations[self.sent:self.sent + count], done=False)
        if self.sent == 0:
            payload["header"] = _header(self.run.trace.rows, self.run.config.describe())
        self.sent += count
        self.last_sent = now
        self._send(payload)

    def finish(self, report: dict, total: int) -> None:
        """The full map once the run ends (normally or not): it corrects anything a client missed."""
        if not self.enabled:
            return
        self._send({**self._base(total, total, done=True), **compact(report), "full": True})

    def _base(self, step: int, total: int, done: bool) -> dict:
        return {"node": self.node_id, "run": self.run_id, "step": step, "total": total, "done": done}

    def _message(self, step, total, start, evaluations, done) -> dict:
        run = self.run
        fraction = run.trace.compute_fraction()
        return {
            **self._base(step, total, done),
            "start": start,
            "columns": [encode_column(ev.actions) for ev in evaluations],
            "evaluations": [_evaluation(ev.step, ev.sigma, ev.indicator, ev.decision) for ev in evaluations],
            "summary": {"compute_fraction": fraction, "ideal_speedup": 1.0 / fraction if fraction > 0 else None,
                        "elapsed_s": self.clock() - self.started, "peak_cache_bytes": run.peak_bytes,
                        "evaluations": len(run.trace.evaluations),
                        "evaluations_computed": len(run.trace.computed_evaluations())},
        }

    def _send(self, payload: dict) -> None:
        self.server.send_sync(PROGRESS_EVENT, payload, self.client_id)


APPLY_NODE = "ApplyFeatureCache"


def _running_prompt(server, prompt_id) -> Optional[dict]:
    queue = getattr(server, "prompt_queue", None)
    for item in list(getattr(queue, "currently_running", {}).values()):
        if item[1] == prompt_id:
            return item[2]
    return None


def apply_node_of_current_sampler(server, recorded_id: Optional[str]) -> Optional[str]:
    """The id of the Apply Feature Cache node that feeds the sampler running now.

    The host caches Apply's output without its node id (it looks for the hidden UNIQUE_ID in V1 form
    only), so a cached model can reach a sampler under another id, e.g. after Apply was moved into a
    subgraph ("26:22"); the id recorded when Apply executed is then stale. Walks up the running
    prompt's links from the executing node; keeps the recorded id when it is an ancestor or when the
    answer is ambiguous (several Apply nodes) or unknown (no server, a node the host expanded)."""
    try:
        from comfy_execution.utils import get_executing_context
    except ImportError:
        return recorded_id
    context = get_executing_context()
    prompt = _running_prompt(server, context.prompt_id) if context is not None else None
    if prompt is None or context.node_id not in prompt:
        return recorded_id
    found, seen, pending = [], set(), [context.node_id]
    while pending:
        node_id = pending.pop()
        for value in prompt[node_id]["inputs"].values():
            if isinstance(value, list) and len(value) == 2 and value[0] in prompt and value[0] not in seen:
                seen.add(value[0])
                (found if prompt[value[0]]["class_type"] == APPLY_NODE else pending).append(value[0])
    if recorded_id in found or len(found) != 1:
        return recorded_id
    return found[0]


def start(run: CacheRun, recorded_id: Optional[str]) -> ProgressStream:
    server = _server()
    return ProgressStream(run, apply_node_of_current_sampler(server, recorded_id), server)


def with_progress(callback: Optional[Callable], stream: ProgressStream) -> Optional[Callable]:
    """Wrap the sampler's step callback so each step also streams the cache map."""
    if not stream.enabled:
        return callback

    def step_callback(step, x0, x, total_steps):
        stream.step(step + 1, total_steps)
        if callback is not None:
            return callback(step, x0, x, total_steps)
    return step_callback

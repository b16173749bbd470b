"""The Cache Map as an artist sees it: the real server, the frontend its requirements pin, headless Chromium.

Loads the shipped UI workflows through the frontend, queues the tiny-model ones, and checks from the
page that the maps show one cell per trace cell in the right colour, that hovering a cell shows its
details, that the maps survive a page reload, and that the console stays free of errors.
Screenshots go to out/browser/. Needs Debian's `chromium` and the `playwright` package (never
`playwright install`); without them the test is skipped, except under CI where it fails.
"""
import glob
import json
import os
import re
import shutil
import urllib.request

import pytest

from benchmarks.host import REPO_ROOT
from benchmarks.server import running_server
from benchmarks.ui_workflow import to_api

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOTS = os.path.join(REPO_ROOT, "out", "browser")
TINY_WAN = os.path.join(REPO_ROOT, "benchmarks", "models", "tiny_wan.safetensors")
# A fresh frontend profile raises the frontend's own TypeError while it registers its canvas navigation
# settings (Comfy.Canvas.NavigationMode sets a setting not registered yet); a user who has opened
# ComfyUI once has them. Preset, so that any page error left is ours.
SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Canvas.NavigationMode": "legacy",
            "Comfy.Canvas.LeftMouseClickBehavior": "panning", "Comfy.Canvas.MouseWheelScroll": "zoom"}
# Requests the frontend makes on a fresh user folder or to the internet (unreachable here).
EXPECTED_MISSING = ("/user.css", "/api/userdata", "https://")
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--no-first-run"]


def _requirements():
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is missing (pip install -r requirements-dev.txt)"
    if CHROMIUM is None:
        return "chromium is not installed (Debian/Ubuntu: apt-get install -y chromium)"
    return None


missing = _requirements()
if missing and os.environ.get("CI", "").lower() in ("1", "true"):
    raise RuntimeError(f"browser test: {missing}")
pytestmark = pytest.mark.skipif(missing is not None, reason=f"browser test skipped: {missing}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("browser-server")
    with running_server(str(base), {"tiny_wan.safetensors": TINY_WAN}, SETTINGS) as running:
        yield running.url


class Page:
    """The frontend in Chromium, with what the page logged."""

    def __init__(self, page, url):
        self.page, self.url = page, url
        self.errors = []
        page.on("console", lambda m: m.type == "error" and not m.text.startswith("Failed to load resource")
                and self.errors.append(f"console: {m.text}"))
        page.on("pageerror", lambda e: self.errors.append(f"page error: {e}\n{e.stack}"))
        page.on("response", lambda r: r.status >= 400 and not self._expected(r.url)
                and self.errors.append(f"HTTP {r.status}: {r.url}"))
        page.on("requestfailed", lambda r: not self._expected(r.url) and r.failure != "net::ERR_ABORTED"
                and self.errors.append(f"request failed: {r.url} {r.failure}"))  # aborted: cut short by a reload

    def _expected(self, url):
        return any((url.startswith(p) if p == "https://" else p in url) for p in EXPECTED_MISSING)

    def open(self):
        self.page.goto(self.url)
        self.page.wait_for_function(
            "window.app?.graph && app.extensions?.some(e => e.name === 'FeatureCache.CacheMap')", timeout=60000)
        self.page.evaluate("""() => {
            window.__fc = {success: 0, failure: null, progress: []};
            // A node by type on the root graph, or by execution id ("12:5") through subgraphs.
            window.__fcNode = spec => {
                if (!spec.includes(':')) return app.graph.nodes.find(n => n.type === spec);
                const [outer, inner] = spec.split(':');
                return app.graph.getNodeById(Number(outer)).subgraph.getNodeById(Number(inner));
            };
            const api = window.comfyAPI.api.api;
            api.addEventListener('execution_success', () => { window.__fc.success++; });
            api.addEventListener('execution_error', ({detail}) => { window.__fc.failure = detail; });
            api.addEventListener('feature_cache.progress', ({detail}) => window.__fc.progress.push(
                {node: detail.node, start: detail.start, n: (detail.columns || []).length, done: detail.done}));
        }""")

    def load(self, workflow):
        self.page.evaluate("""wf => app.loadGraphData(wf, true, true, null,
                                {showMissingModelsDialog: false, showMissingNodesDialog: false})""", workflow)
        self.page.wait_for_timeout(200)

    def queue(self):
        """Queues the loaded workflow with a seed not used before (the host would serve a repeat from its cache)."""
        self.runs = getattr(self, "runs", 0) + 1
        before = self.page.evaluate("window.__fc.success")
        self.page.evaluate("""seed => {
            for (const n of app.graph.nodes.filter(n => n.type === 'KSampler'))
                n.widgets.find(w => w.name === 'seed').value = seed;
            app.queuePrompt(0, 1);
        }""", 1000 + self.runs)
        self.page.wait_for_function(f"window.__fc.success > {before} || window.__fc.failure", timeout=60000)
        failure = self.page.evaluate("window.__fc.failure")
        assert failure is None, f"execution failed: {failure}"
        self.page.wait_for_timeout(300)

    def show(self, node_type):
        """Pans the canvas so the node is on screen at zoom 1 (its DOM widget is then laid out)."""
        self.page.evaluate("""type => {
            const node = app.graph.nodes.find(n => n.type === type);
            app.canvas.ds.scale = 1;
            app.canvas.ds.offset = [-node.pos[0] + 60, -node.pos[1] + 60];
            app.canvas.setDirty(true, true);
        }""", node_type)
        self.page.wait_for_timeout(300)

    def map_cells(self, node_type):
        """The map as drawn: state, layout, and the colour at the centre of every cell."""
        return self.page.evaluate("""type => {
            const node = window.__fcNode(type);
            const view = node.__featureCacheMap;
            const l = view.layout;
            const ctx = view.canvas.getContext('2d');
            const dpr = view.canvas.width / parseFloat(view.canvas.style.width);
            const hex = (x, y) => {
                const d = ctx.getImageData(Math.floor(x * dpr), Math.floor(y * dpr), 1, 1).data;
                return '#' + [d[0], d[1], d[2]].map(v => v.toString(16).padStart(2, '0')).join('');
            };
            const cells = [];
            for (let c = 0; c < l.cols; c++) {
                const column = [];
                for (let r = 0; r < l.rows; r++)
                    column.push(hex(l.labelW + c * l.cellW + Math.floor((l.cellW - 1) / 2),
                                    r * l.cellH + Math.floor((l.cellH - 1) / 2)));
                cells.push(column);
            }
            return {cells, layout: l, header: view.state.header, done: view.state.done,
                    columns: view.state.columns, summary: view.summary.textContent,
                    legend: [...view.legend.querySelectorAll('.fc-legend-item')].map(e => e.textContent)};
        }""", node_type)

    def screenshot(self, name):
        os.makedirs(SCREENSHOTS, exist_ok=True)
        self.page.screenshot(path=os.path.join(SCREENSHOTS, name))


@pytest.fixture(scope="module")
def ui(server):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        page = Page(browser.new_page(viewport={"width": 1600, "height": 1000}), server)
        page.open()
        yield page
        browser.close()


def _workflow(name):
    with open(os.path.join(REPO_ROOT, "workflows", name)) as f:
        return json.load(f)


def _latest_report(url):
    with urllib.request.urlopen(url + "/history?max_items=1") as response:
        history = json.loads(response.read())
    (entry,) = history.values()
    return next(ui["feature_cache_report"][0] for ui in entry["outputs"].values() if "feature_cache_report" in ui)


def _check_map(ui, node_type, report):
    drawn = ui.map_cells(node_type)
    color = {e["action"]: e["color"] for e in drawn["header"]["legend"]}
    trace = report["trace"]
    assert drawn["header"]["rows"] == trace["rows"]
    assert len(drawn["cells"]) == len(trace["evaluations"]) and drawn["layout"]["rows"] == len(trace["rows"])
    expected = [[color.get(a, drawn["header"]["not_run_color"]) if a else drawn["header"]["not_run_color"]
                 for a in e["actions"]] for e in trace["evaluations"]]
    assert drawn["cells"] == expected, f"{node_type}: drawn cells differ from the trace"
    assert drawn["done"] and "compute" in drawn["summary"] and "MiB" in drawn["summary"]
    assert drawn["layout"]["cellW"] >= 8, "cells below the legible minimum"
    for label in ("computed", "reused", "forecast", "partial", "verified-rejected"):
        assert any(item.startswith(label) for item in drawn["legend"]), f"legend lacks {label}"
    return drawn


def test_every_shipped_workflow_loads_in_the_frontend_and_converts_like_the_test_converter(ui, server):
    with urllib.request.urlopen(server + "/object_info") as response:
        info = json.loads(response.read())
    paths = sorted(glob.glob(os.path.join(REPO_ROOT, "workflows", "*.json")))
    assert len(paths) >= 10
    for path in paths:
        with open(path) as f:
            workflow = json.load(f)
        ui.load(workflow)
        prompt = ui.page.evaluate("async () => (await app.graphToPrompt()).output")
        frontend = {nid: {"class_type": n["class_type"], "inputs": n["inputs"]} for nid, n in prompt.items()}
        assert frontend == to_api(workflow, info), os.path.basename(path)
        if os.path.basename(path) == "flux_t2i_teacache_taylor.json":
            ui.page.evaluate("app.canvas.ds.scale = 0.65; app.canvas.ds.offset = [10, 420]; "
                             "app.canvas.setDirty(true, true)")
            ui.page.wait_for_timeout(300)
            ui.screenshot("workflow_flux_loaded.png")
    for path in sorted(glob.glob(os.path.join(REPO_ROOT, "workflows", "api", "*.json"))):
        with open(path) as f:  # API-format files dropped on the page load too
            ui.page.evaluate("([wf, name]) => app.loadApiJson(wf, name)", [json.load(f), os.path.basename(path)])
        assert ui.page.evaluate("app.graph.nodes.some(n => n.type === 'ApplyFeatureCache')"), path
    assert not ui.errors, "\n".join(ui.errors)


def _run_and_check_both_maps(ui, server, name, screenshot):
    """Queues a shipped workflow; the live map (Apply) and the finished one (Cache Map) match its trace."""
    ui.load(_workflow(name))
    ui.queue()
    report = _latest_report(server)
    drawn = _check_map(ui, "ApplyFeatureCache", report)  # live, on the node that caches
    _check_map(ui, "FeatureCacheMap", report)  # after sampling, from the node's output
    ui.show("ApplyFeatureCache")
    ui.screenshot(screenshot)
    return report, drawn


def test_image_map_live_and_after_sampling_with_hover_details(ui, server):
    report, drawn = _run_and_check_both_maps(ui, server, "demo.json", "image_map.png")
    progress = ui.page.evaluate("window.__fc.progress")
    apply_id = str(next(n["id"] for n in _workflow("demo.json")["nodes"] if n["type"] == "ApplyFeatureCache"))
    assert progress[-1] == {"node": apply_id, "start": 0, "n": len(report["trace"]["evaluations"]), "done": True}
    assert len(progress) <= 1 + 4 * max(1.0, report["elapsed_s"]) + 1  # throttled

    # Hover the second row of the fourth column with the real mouse.
    c, r = 3, 1
    layout = drawn["layout"]
    box = ui.page.evaluate("""() => { const rect = app.graph.nodes.find(n => n.type === 'ApplyFeatureCache')
                                 .__featureCacheMap.canvas.getBoundingClientRect();
                                 return {x: rect.left, y: rect.top}; }""")
    ui.page.mouse.move(box["x"] + layout["labelW"] + c * layout["cellW"] + layout["cellW"] / 2,
                       box["y"] + r * layout["cellH"] + layout["cellH"] / 2)
    ui.page.wait_for_timeout(200)
    tooltip = ui.page.evaluate("""() => { const t = [...document.querySelectorAll('.feature-cache-tooltip')]
                                  .find(t => t.style.display === 'block'); return t ? t.textContent : null; }""")
    evaluation = report["trace"]["evaluations"][c]
    label = {e["action"]: e["label"] for e in drawn["header"]["legend"]}[evaluation["actions"][r]]
    assert tooltip is not None, "no tooltip on hover"
    assert f"step {evaluation['step'] + 1}/" in tooltip and f"block {report['trace']['rows'][r]}" in tooltip
    assert f"action {label}" in tooltip and "sigma" in tooltip
    if report["threshold"] is None:  # an adaptive policy under a compute budget has no fixed threshold
        budget = re.search(r"compute budget (\S+)", tooltip).group(1)
        assert float(budget) == pytest.approx(report["budget"], rel=1e-2)
    else:
        threshold = re.search(r"threshold (\S+)", tooltip).group(1)
        assert float(threshold) == pytest.approx(report["threshold"], rel=1e-2)
    indicator = re.search(r"indicator (\S+)", tooltip).group(1)
    if evaluation["indicator"] is None:
        assert indicator == "-"
    else:
        assert float(indicator) == pytest.approx(evaluation["indicator"], rel=1e-2)
    ui.screenshot("image_map_hover.png")
    assert not ui.errors, "\n".join(ui.errors)


def test_video_map_a_1000_block_map_that_scrolls_and_zooms_and_both_survive_a_reload(ui, server):
    report, _ = _run_and_check_both_maps(ui, server, "tiny_wan_video.json", "video_map.png")
    assert len(set(e["step"] for e in report["trace"]["evaluations"])) == 20

    # A deep video model's map (1000 blocks x 50 steps), sent as the server would at the end of a run.
    node_id = ui.page.evaluate("String(app.graph.nodes.find(n => n.type === 'ApplyFeatureCache').id)")
    header = ui.map_cells("ApplyFeatureCache")["header"]
    rows = [f"double_block {i}" for i in range(1000)]
    columns = ["".join("0" if (c % 4 == 0 or r < 2) else "2" for r in range(1000)) for c in range(50)]
    message = {"node": node_id, "run": "deep", "step": 50, "total": 50, "done": True, "full": True, "start": 0,
               "header": {**header, "rows": rows}, "columns": columns,
               "evaluations": [[c, 1 - c / 50, 0.01 * c, "computed"] for c in range(50)],
               "summary": {"compute_fraction": 0.3, "ideal_speedup": 3.3, "elapsed_s": 60.0, "peak_cache_bytes": 2**30}}
    ui.page.evaluate("m => window.comfyAPI.api.api.dispatchCustomEvent('feature_cache.progress', m)", message)
    ui.page.wait_for_timeout(200)
    drawn = ui.map_cells("ApplyFeatureCache")
    assert len(drawn["cells"]) == 50 and drawn["layout"]["rows"] == 1000
    assert all(col[0] == header["legend"][0]["color"] for col in drawn["cells"])
    scroll = ui.page.evaluate("""() => {
        const v = app.graph.nodes.find(n => n.type === 'ApplyFeatureCache').__featureCacheMap;
        return {scroll: v.scroll.scrollHeight, client: v.scroll.clientHeight,
                                         width: v.canvas.width}; }""")
    assert scroll["scroll"] > scroll["client"], "a 1000-row map must scroll"
    ui.page.evaluate("""() => app.graph.nodes.find(n => n.type === 'ApplyFeatureCache').__featureCacheMap
                              .box.querySelector('.fc-zoom-zoom-in').click()""")
    zoomed = ui.page.evaluate("window.__fcNode('ApplyFeatureCache').__featureCacheMap.canvas.width")
    assert zoomed > scroll["width"]
    ui.show("ApplyFeatureCache")
    ui.screenshot("video_map_1000_blocks_zoomed.png")

    # Both maps survive a page reload (kept in the nodes' properties with the workflow).
    ui.page.reload()
    ui.open()
    _check_map(ui, "FeatureCacheMap", report)
    restored = ui.map_cells("ApplyFeatureCache")
    assert restored["header"]["rows"] == rows and len(restored["columns"]) == 50 and restored["columns"] == columns
    ui.show("FeatureCacheMap")
    ui.screenshot("after_reload.png")
    assert not ui.errors, "\n".join(ui.errors)


def test_events_for_gone_nodes_mid_run_pages_and_runs_without_fills_never_throw(ui):
    node_id = ui.page.evaluate("String(app.graph.nodes.find(n => n.type === 'ApplyFeatureCache').id)")
    header = ui.map_cells("ApplyFeatureCache")["header"]
    send = "m => window.comfyAPI.api.api.dispatchCustomEvent('feature_cache.progress', m)"
    ui.page.evaluate(send, {"node": "9999", "run": "x", "start": 0, "columns": ["0"],
                            "evaluations": [[0, 1, None, "computed"]]})
    ui.page.evaluate(send, {"node": "12:7:5", "run": "x", "start": 0, "columns": ["0"]})  # subgraph that is not there
    # A page opened mid-run: the first message it sees starts at evaluation 5, without the header.
    ui.page.evaluate(send, {"node": node_id, "run": "mid", "step": 7, "total": 10, "done": False, "start": 5,
                            "columns": ["00", "00"],
                            "evaluations": [[5, 0.5, None, "computed"], [6, 0.4, None, "computed"]],
                            "summary": {"compute_fraction": 1.0}})
    mid = ui.map_cells("ApplyFeatureCache")
    assert len(mid["cells"]) == 7 and mid["layout"]["rows"] == 2
    # The end of that run computed every step (no cached step at all).
    ui.page.evaluate(send, {"node": node_id, "run": "mid", "step": 10, "total": 10, "done": True, "full": True,
                            "start": 0, "header": {**header, "rows": ["model"]}, "columns": ["0"] * 10,
                            "evaluations": [[i, 1 - i / 10, None, "computed"] for i in range(10)],
                            "summary": {"compute_fraction": 1.0, "ideal_speedup": 1.0, "elapsed_s": 1.0,
                                        "peak_cache_bytes": 0}})
    done = ui.map_cells("ApplyFeatureCache")
    assert len(done["cells"]) == 10 and all(col == [header["legend"][0]["color"]] for col in done["cells"])
    ui.page.evaluate(send, {"node": node_id, "run": "empty", "step": 0, "total": 0, "done": True, "full": True,
                            "start": 0, "header": header, "columns": [], "evaluations": []})
    assert not ui.errors, "\n".join(ui.errors)


def test_the_live_map_works_inside_a_subgraph(ui, server):
    ui.load(_workflow("demo.json"))
    ui.queue()  # at the root first: the host then reuses this Apply output inside the subgraph
    execution_id = ui.page.evaluate("""() => {
        const inner = app.graph.nodes.filter(n => ['ApplyFeatureCache', 'FeatureCachePolicy',
                                                    'FeatureCacheForecaster'].includes(n.type));
        const { subgraph, node } = app.graph.convertToSubgraph(new Set(inner));
        const apply = subgraph.nodes.find(n => n.type === 'ApplyFeatureCache');
        return `${node.id}:${apply.id}`;
    }""")
    ui.queue()
    report = _latest_report(server)
    progress = ui.page.evaluate("window.__fc.progress")
    # The host reused the root run's cached Apply output (its id is not in the host's cache key);
    # the events must still name the node inside the subgraph.
    assert progress[-1]["node"] == execution_id and progress[-1]["done"], progress[-1]
    _check_map(ui, execution_id, report)  # drawn on the Apply node inside the subgraph
    _check_map(ui, "FeatureCacheMap", report)
    assert not ui.errors, "\n".join(ui.errors)

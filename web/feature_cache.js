// The Cache Map widget: the step x block map of the feature cache, live on Apply Feature Cache while the
// sampler runs and on Cache Map after it. Axes (steps along x, blocks along y), a legend, hover details
// (step, sigma, block, action, the policy's indicator and threshold), the run summary, zoom and scroll
// for deep video models. The last run is kept in the node's properties, so it survives a page reload.
//
// Server messages ("feature_cache.progress", nodes/progress.py): {node, run, step, total, done, full?,
// start, columns: one string per evaluation (a legend code per row), evaluations: [step, sigma,
// indicator, decision], summary, header? {rows, legend, threshold, method, ...}}. The listener is
// registered at module load: the frontend drops custom events nobody listens to.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const EVENT = "feature_cache.progress";
const MAP_NODES = new Set(["ApplyFeatureCache", "FeatureCacheMap"]);
const PROPERTY = "feature_cache_map";
const MAX_STORED_CELLS = 200000; // larger maps are not kept in the workflow
const MIN_CELL_W = 8; // a 30-step image map stays legible
const MIN_CELL_H = 4;
const MAX_CELL_H = 24;
const AXIS_H = 30;
const HEADER_H = 46; // summary + legend lines above the map
const MIN_MAP_H = 120;
const MAX_CANVAS = 16000;

function emptyState() {
  return { run: null, header: null, columns: [], evaluations: [], step: 0, total: 0, done: false, summary: null };
}

/** Merges one server message (incremental or full) into a node's map state. */
export function applyMessage(state, message) {
  if (message.full || message.run !== state.run) {
    Object.assign(state, emptyState(), { run: message.run });
  }
  if (message.header) state.header = message.header;
  const start = message.start ?? 0;
  (message.columns ?? []).forEach((column, i) => {
    state.columns[start + i] = column;
    state.evaluations[start + i] = message.evaluations?.[i] ?? null;
  });
  state.step = message.step ?? state.step;
  state.total = message.total ?? state.total;
  state.done = !!message.done;
  state.summary = message.summary ?? state.summary;
  return state;
}

/** Resolves an execution id ("5", or "12:7:5" inside subgraphs) to the node on the root graph or a subgraph. */
function nodeByExecutionId(id) {
  let graph = app.graph;
  const parts = String(id).split(":");
  let node = null;
  for (let i = 0; i < parts.length; i++) {
    if (!graph) return null;
    node = graph.getNodeById?.(parts[i]) ?? graph.getNodeById?.(Number(parts[i])) ?? null;
    if (!node) return null;
    if (i < parts.length - 1) graph = node.subgraph;
  }
  return node;
}

function fmt(value, digits = 3) {
  if (value === null || value === undefined || Number.isNaN(value)) return "-";
  return Math.abs(value) >= 1000 || (Math.abs(value) < 1e-3 && value !== 0) ? value.toExponential(2)
    : Number(value).toPrecision(digits);
}

function summaryText(state) {
  const s = state.summary;
  if (!state.run) return "Cache map: waiting for a sampling run";
  if (!s) return "Cache map";
  const parts = [];
  parts.push(state.done ? "done" : `step ${state.step}/${state.total}`);
  parts.push(`compute ${(100 * (s.compute_fraction ?? 1)).toFixed(1)}%`);
  parts.push(`ideal ${s.ideal_speedup ? s.ideal_speedup.toFixed(2) + "x" : "-"}`);
  if (s.elapsed_s !== null && s.elapsed_s !== undefined) parts.push(`${s.elapsed_s.toFixed(2)} s`);
  parts.push(`peak cache ${((s.peak_cache_bytes ?? 0) / 2 ** 20).toFixed(1)} MiB`);
  return parts.join(" · ");
}

function rowName(state, r) {
  return state.header?.rows?.[r] ?? `row ${r}`;
}

function shortRow(name) {
  return name.replace("_block", "");
}

class CacheMapView {
  constructor(node) {
    this.node = node;
    this.state = emptyState();
    this.zoom = 1;
    this.layout = null;
    this.box = document.createElement("div");
    this.box.className = "feature-cache-map";
    this.box.style.cssText = "display:flex;flex-direction:column;gap:3px;width:100%;height:100%;box-sizing:border-box;"
      + "font:11px sans-serif;color:#ccc;overflow:hidden";
    this.summary = document.createElement("div");
    this.summary.className = "fc-summary";
    this.summary.style.cssText = "white-space:nowrap;overflow:hidden;text-overflow:ellipsis";
    const bar = document.createElement("div");
    bar.style.cssText = "display:flex;gap:6px;align-items:center;flex-wrap:nowrap";
    this.legend = document.createElement("div");
    this.legend.className = "fc-legend";
    this.legend.style.cssText = "display:flex;gap:8px;flex-wrap:wrap;flex:1";
    const zoom = document.createElement("div");
    zoom.style.cssText = "display:flex;gap:2px";
    for (const [label, title, factor] of [["−", "zoom out", 0.5], ["+", "zoom in", 2], ["fit", "fit", 0]]) {
      const button = document.createElement("button");
      button.textContent = label;
      button.title = title;
      button.className = `fc-zoom fc-zoom-${title.replace(" ", "-")}`;
      button.style.cssText = "font:10px sans-serif;padding:0 4px;background:#333;color:#ccc;border:1px solid #555;"
        + "border-radius:3px;cursor:pointer";
      button.addEventListener("click", () => {
        this.zoom = factor ? Math.min(16, Math.max(0.25, this.zoom * factor)) : 1;
        this.draw();
      });
      zoom.append(button);
    }
    bar.append(this.legend, zoom);
    this.scroll = document.createElement("div");
    this.scroll.className = "fc-scroll";
    this.scroll.style.cssText = "flex:1;min-height:0;overflow:auto;background:#151515;border-radius:4px";
    this.canvas = document.createElement("canvas");
    this.canvas.className = "fc-canvas";
    this.canvas.style.display = "block";
    this.scroll.append(this.canvas);
    this.box.append(this.summary, bar, this.scroll);
    this.tooltip = document.createElement("div");
    this.tooltip.className = "feature-cache-tooltip";
    this.tooltip.style.cssText = "position:fixed;z-index:10000;display:none;pointer-events:none;background:#222;"
      + "color:#eee;border:1px solid #666;border-radius:4px;padding:4px 6px;font:11px sans-serif;white-space:pre";
    document.body.append(this.tooltip);
    this.canvas.addEventListener("mousemove", (e) => this.hover(e));
    this.canvas.addEventListener("mouseleave", () => { this.tooltip.style.display = "none"; });
    this.scroll.addEventListener("wheel", (e) => {
      if (!e.ctrlKey) return; // ctrl + wheel zooms the map; plain wheel scrolls it
      e.preventDefault();
      e.stopPropagation();
      this.zoom = Math.min(16, Math.max(0.25, this.zoom * (e.deltaY < 0 ? 1.25 : 0.8)));
      this.draw();
    }, { passive: false });
    new ResizeObserver(() => this.draw()).observe(this.scroll);
    this.widget = node.addDOMWidget("feature_cache_map", "feature_cache_map", this.box, {
      serialize: false,
      hideOnZoom: false,
      getMinHeight: () => HEADER_H + MIN_MAP_H,
    });
  }

  remove() {
    this.tooltip.remove();
  }

  show(state) {
    this.state = state;
    this.draw();
  }

  drawLegend() {
    const entries = this.state.header?.legend ?? [];
    const key = entries.map((e) => e.code + e.label).join("|");
    if (key === this.legendKey) return;
    this.legendKey = key;
    this.legend.replaceChildren(...entries.map((entry) => {
      const item = document.createElement("span");
      item.className = "fc-legend-item";
      item.dataset.action = entry.action;
      item.style.cssText = "display:inline-flex;align-items:center;gap:3px;white-space:nowrap";
      const swatch = document.createElement("span");
      swatch.style.cssText = `display:inline-block;width:10px;height:10px;border-radius:2px;background:${entry.color}`;
      item.append(swatch, entry.label);
      return item;
    }));
  }

  draw() {
    const state = this.state;
    this.summary.textContent = summaryText(state);
    this.drawLegend();
    const cols = state.columns.length;
    const rows = state.header?.rows?.length ?? Math.max(0, ...Array.from(state.columns, (c) => c?.length ?? 0));
    const ctx = this.canvas.getContext("2d");
    const dpr = window.devicePixelRatio || 1;
    const width = Math.max(this.scroll.clientWidth, 50);
    const height = Math.max(this.scroll.clientHeight, 50);
    if (!cols || !rows) {
      this.layout = null;
      this.setCanvasSize(width, Math.min(height, 40), dpr);
      ctx.fillStyle = "#888";
      ctx.font = "11px sans-serif";
      ctx.fillText(state.run ? "no model evaluation recorded yet" : "run the workflow to see the map", 8, 20);
      return;
    }
    ctx.font = "10px sans-serif";
    let labelW = 0;
    for (let r = 0; r < rows; r++) labelW = Math.max(labelW, ctx.measureText(shortRow(rowName(state, r))).width);
    labelW = Math.ceil(labelW) + 8;
    // Cells fill the node, never below the legible minimum; zoom scales them (canvases stop at ~32k pixels).
    const cellW = Math.min(Math.max(MIN_CELL_W, Math.floor((width - labelW - 4) / cols)) * this.zoom,
      Math.max(1, Math.floor(MAX_CANVAS / cols)));
    const cellH = Math.min(Math.min(MAX_CELL_H, Math.max(MIN_CELL_H, Math.floor((height - AXIS_H - 2) / rows))) * this.zoom,
      Math.max(1, Math.floor(MAX_CANVAS / rows)));
    const gridW = cols * cellW;
    const gridH = rows * cellH;
    this.layout = { labelW, cellW, cellH, cols, rows, top: 0 };
    this.setCanvasSize(labelW + gridW + 4, gridH + AXIS_H, dpr);
    ctx.font = "10px sans-serif";
    const colors = {};
    for (const entry of state.header?.legend ?? []) colors[entry.code] = entry.color;
    const notRun = state.header?.not_run_color ?? "#282828";
    ctx.fillStyle = "#0c0c0c";
    ctx.fillRect(labelW, 0, gridW, gridH);
    const gap = cellW >= 5 && cellH >= 5 ? 1 : 0;
    for (let c = 0; c < cols; c++) {
      const column = state.columns[c];
      if (!column) continue; // not received yet (page opened mid-run): the final message fills it
      for (let r = 0; r < rows; r++) {
        ctx.fillStyle = colors[column[r]] ?? notRun;
        ctx.fillRect(labelW + c * cellW, r * cellH, cellW - gap, cellH - gap);
      }
    }
    ctx.fillStyle = "#bbb";
    ctx.textBaseline = "middle";
    const rowEvery = Math.max(1, Math.ceil(12 / cellH));
    for (let r = 0; r < rows; r += rowEvery) ctx.fillText(shortRow(rowName(state, r)), 2, r * cellH + cellH / 2);
    ctx.textBaseline = "top";
    const colEvery = Math.max(1, Math.ceil(22 / cellW));
    for (let c = 0; c < cols; c += colEvery) {
      const step = state.evaluations[c]?.[0];
      const label = step === undefined || step === null ? "" : String(step + 1);
      const x = labelW + c * cellW + cellW / 2;
      ctx.fillRect(x, gridH, 1, 3);
      ctx.fillText(label, x - ctx.measureText(label).width / 2, gridH + 4);
    }
    ctx.fillStyle = "#888";
    ctx.fillText(`step →   block ↓   (${rows} × ${cols} evaluations${this.zoom !== 1 ? `, zoom ${this.zoom}x` : ""})`,
      labelW, gridH + 17);
  }

  setCanvasSize(width, height, dpr) {
    this.canvas.width = Math.round(width * dpr);
    this.canvas.height = Math.round(height * dpr);
    this.canvas.style.width = `${width}px`;
    this.canvas.style.height = `${height}px`;
    this.canvas.getContext("2d").setTransform(dpr, 0, 0, dpr, 0, 0);
  }

  /** The cell under a point of the canvas (CSS pixels), or null. */
  cellAt(x, y) {
    const l = this.layout;
    if (!l) return null;
    const c = Math.floor((x - l.labelW) / l.cellW);
    const r = Math.floor(y / l.cellH);
    if (c < 0 || r < 0 || c >= l.cols || r >= l.rows) return null;
    return { c, r };
  }

  details(c, r) {
    const state = this.state;
    const column = state.columns[c];
    const ev = state.evaluations[c];
    const legend = state.header?.legend ?? [];
    const code = column?.[r];
    const action = code === "-" ? "not run (outside the cached site)"
      : legend.find((e) => e.code === code)?.label ?? (column ? code : "not received");
    const [step, sigma, indicator, decision] = ev ?? [];
    const lines = [
      `step ${step === undefined ? "?" : step + 1}/${state.total || "?"} (evaluation ${c + 1})`,
      `sigma ${fmt(sigma, 4)}`,
      `block ${rowName(state, r)}`,
      `action ${action}`,
      `indicator ${fmt(indicator)} · ` + (state.header?.threshold === null && state.header?.budget !== undefined
        && state.header?.budget !== null ? `compute budget ${fmt(state.header.budget)}`
        : `threshold ${fmt(state.header?.threshold)}`)
        + (state.header?.method ? ` (${state.header.method})` : ""),
    ];
    if (decision) lines.push(`evaluation decision ${decision}`);
    return lines.join("\n");
  }

  hover(e) {
    const rect = this.canvas.getBoundingClientRect();
    const cell = this.cellAt(e.clientX - rect.left, e.clientY - rect.top);
    if (!cell) {
      this.tooltip.style.display = "none";
      return;
    }
    this.tooltip.textContent = this.details(cell.c, cell.r);
    this.tooltip.style.left = `${e.clientX + 14}px`;
    this.tooltip.style.top = `${e.clientY + 14}px`;
    this.tooltip.style.display = "block";
  }
}

function viewOf(node) {
  if (!node.__featureCacheMap) {
    node.__featureCacheMap = new CacheMapView(node);
    const [w, h] = node.size;
    node.setSize([Math.max(w, 420), Math.max(h, node.computeSize()[1] + 60)]);
  }
  return node.__featureCacheMap;
}

/** Keeps a finished map in the node's properties (saved with the workflow, restored after a reload). */
function store(node, state) {
  const cells = state.columns.length * (state.header?.rows?.length ?? 0);
  node.properties ??= {};
  if (!state.header || cells > MAX_STORED_CELLS) {
    delete node.properties[PROPERTY];
    return;
  }
  const { run, header, columns, evaluations, step, total, summary } = state;
  node.properties[PROPERTY] = { run, header, columns, evaluations, step, total, summary, done: true };
  app.extensionManager?.workflow?.activeWorkflow?.changeTracker?.checkState?.();
}

function show(node, state, persist) {
  const view = viewOf(node);
  view.show(state);
  if (persist) store(node, state);
  node.setDirtyCanvas?.(true, false);
}

api.addEventListener(EVENT, ({ detail }) => {
  try {
    const node = nodeByExecutionId(detail?.node);
    if (!node || !MAP_NODES.has(node.comfyClass ?? node.type)) return; // gone, or another workflow is open
    show(node, applyMessage(viewOf(node).state, detail), !!detail.done);
  } catch (error) {
    console.warn("Feature cache: could not draw the cache map", error);
  }
});

app.registerExtension({
  name: "FeatureCache.CacheMap",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!MAP_NODES.has(nodeData.name)) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      viewOf(this).draw();
      return result;
    };
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      const result = onConfigure?.apply(this, arguments);
      const saved = this.properties?.[PROPERTY];
      if (saved?.header) show(this, { ...emptyState(), ...saved, done: true }, false);
      return result;
    };
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      onExecuted?.apply(this, arguments);
      const compact = output?.feature_cache_map?.[0];
      if (!compact) return;
      const state = applyMessage(emptyState(), { ...compact, run: `executed-${Date.now()}`, full: true, done: true });
      show(this, state, true);
    };
    const onRemoved = nodeType.prototype.onRemoved;
    nodeType.prototype.onRemoved = function () {
      this.__featureCacheMap?.remove();
      return onRemoved?.apply(this, arguments);
    };
  },
});

// Live cache map: draws the step x layer grid on Apply Feature Cache while the sampler runs,
// and the final map on Cache Map when it executes. Listens to "feature_cache.progress"
// (registered at module load: the frontend drops custom events nobody listens to).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const COLORS = { C: "#dc463c", R: "#4682dc", F: "#50be6e", P: "#e6b43c", X: "#aa3cc8", "-": "#282828" };
const LETTERS = { computed: "C", reused: "R", forecast: "F", partial: "P", rejected: "X" };
const MAP_NODES = new Set(["ApplyFeatureCache", "FeatureCacheMap"]);

function ensureWidget(node) {
  if (node.__featureCacheMap) return node.__featureCacheMap;
  const box = document.createElement("div");
  box.style.cssText = "display:flex;flex-direction:column;gap:2px;width:100%;font:11px sans-serif;color:#bbb";
  const canvas = document.createElement("canvas");
  canvas.style.cssText = "width:100%;image-rendering:pixelated;background:#111";
  const caption = document.createElement("div");
  box.append(canvas, caption);
  node.addDOMWidget("feature_cache_map", "feature_cache_map", box, { serialize: false, hideOnZoom: false });
  node.__featureCacheMap = { canvas, caption };
  return node.__featureCacheMap;
}

export function drawMap(widget, columns, rowCount, captionText) {
  const { canvas, caption } = widget;
  const cols = Math.max(columns.length, 1);
  const rows = Math.max(rowCount, 1);
  canvas.width = cols;
  canvas.height = rows;
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = COLORS["-"];
  ctx.fillRect(0, 0, cols, rows);
  columns.forEach((column, x) => {
    for (let y = 0; y < column.length; y++) {
      ctx.fillStyle = COLORS[column[y]] || COLORS["-"];
      ctx.fillRect(x, y, 1, 1);
    }
  });
  caption.textContent = captionText;
}

function summary(fraction, step, total) {
  const speedup = fraction > 0 ? (1 / fraction).toFixed(2) : "∞";
  return `step ${step}/${total} · compute ${(100 * fraction).toFixed(1)}% · ideal ${speedup}x`;
}

api.addEventListener("feature_cache.progress", ({ detail }) => {
  const node = app.graph?.getNodeById(Number(detail.node)) ?? app.graph?.getNodeById(detail.node);
  if (!node) return;
  drawMap(ensureWidget(node), detail.columns, detail.rows.length,
          summary(detail.compute_fraction, detail.step, detail.total) + (detail.done ? " · done" : ""));
  node.setDirtyCanvas(true, false);
});

app.registerExtension({
  name: "FeatureCache.CacheMap",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!MAP_NODES.has(nodeData.name)) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      ensureWidget(this);
      return result;
    };
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      onExecuted?.apply(this, arguments);
      const report = output?.feature_cache_report?.[0];
      if (!report) return;
      const columns = report.trace.evaluations.map((e) => e.actions.map((a) => LETTERS[a] || "-").join(""));
      const total = report.trace.evaluations.length;
      drawMap(ensureWidget(this), columns, report.trace.rows.length,
              summary(report.compute_fraction, total, total) + ` · peak cache ${(report.peak_cache_bytes / 2 ** 20).toFixed(1)} MiB`);
    };
  },
});

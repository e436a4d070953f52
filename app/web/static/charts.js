// An experiment's training metrics as uPlot charts (vendored under vendor/uplot, MIT): loss and eval loss,
// learning rate, grad norm and tokens/s against the optimizer step, with axes, hover values (uPlot's
// legend follows the cursor) and a log-scale toggle for the loss. `MetricCharts.add` appends metric events
// as they arrive over the experiment's SSE stream; `compareLoss` overlays several runs' loss on one chart.

import uPlot from "./vendor/uplot/uPlot.esm.js";

const PANELS = [
  { id: "loss", title: "loss", unit: "nats/token", series: [["loss", "train loss"], ["eval_loss", "eval loss"]], log: true },
  { id: "lr", title: "learning rate", unit: "", series: [["learning_rate", "learning rate"]] },
  { id: "grad", title: "grad norm", unit: "L2", series: [["grad_norm", "grad norm"]] },
  { id: "tps", title: "throughput", unit: "tokens/s", series: [["tokens_per_second", "tokens/s"]] },
];
const COLORS = ["#1a56db", "#c2410c", "#137333", "#7e22ce", "#b91c1c", "#0e7490"];
const WIDTH = 520, HEIGHT = 180;

function options(title, unit, labels, logScale, width = WIDTH) {
  return {
    title, width, height: HEIGHT,
    scales: { x: { time: false }, y: { distr: logScale ? 3 : 1 } },
    axes: [{ label: "step" }, { label: unit, size: 60 }],
    series: [{ label: "step" }, ...labels.map((label, i) => ({ label, stroke: COLORS[i % COLORS.length], width: 2,
                                                               spanGaps: true, points: { size: 4 } }))],
  };
}

// As wide as the page allows, up to WIDTH: a phone gets a chart that fits its screen.
function fitWidth(container) {
  return Math.max(260, Math.min(WIDTH, (container.clientWidth || WIDTH) - 8));
}

// Rows of [step, value per series] aligned on step: uPlot's columnar data, gaps as null.
function columns(points, keys) {
  const steps = [...new Set(points.map((p) => p.step))].sort((a, b) => a - b);
  const at = new Map(steps.map((step, i) => [step, i]));
  const data = [steps, ...keys.map(() => steps.map(() => null))];
  for (const point of points) {
    keys.forEach((key, k) => { if (typeof point[key] === "number") data[k + 1][at.get(point.step)] = point[key]; });
  }
  return data;
}

export class MetricCharts {
  constructor(root) {
    this.root = root;
    this.points = [];
    this.plots = new Map();
    this.log = false;
  }

  reset(points) {
    this.points = points.filter((p) => typeof p.step === "number");
    this.draw();
  }

  add(point) {
    if (typeof point.step !== "number") return;
    this.points.push(point);
    for (const panel of PANELS) {
      const plot = this.plots.get(panel.id);
      if (plot) plot.setData(columns(this.points, panel.series.map(([key]) => key)));
    }
    this.count();
  }

  setLog(on) {
    this.log = on;
    this.draw();
  }

  draw() {
    for (const plot of this.plots.values()) plot.destroy();
    this.plots.clear();
    this.root.replaceChildren();
    for (const panel of PANELS) {
      const keys = panel.series.map(([key]) => key);
      const box = document.createElement("div");
      box.className = "chart";
      box.id = `chart-${panel.id}`;
      box.setAttribute("role", "img");
      box.tabIndex = 0;  // wider than a phone: it scrolls sideways, so the keyboard must reach it
      box.setAttribute("aria-label", `${panel.title} against step`);
      this.root.append(box);
      const opts = options(panel.title, panel.unit, panel.series.map(([, label]) => label), panel.log && this.log,
                           fitWidth(this.root));
      this.plots.set(panel.id, new uPlot(opts, columns(this.points, keys), box));
    }
    this.count();
  }

  // How many steps each chart shows (distinct steps with a value), as an attribute a test reads.
  count() {
    for (const panel of PANELS) {
      const keys = panel.series.map(([key]) => key);
      const n = new Set(this.points.filter((p) => keys.some((key) => typeof p[key] === "number")).map((p) => p.step)).size;
      this.root.querySelector(`#chart-${panel.id}`)?.setAttribute("data-points", String(n));
    }
  }
}

// Several runs' training loss on one chart: `runs` is [{name, points}], each point {step, loss}.
export function compareLoss(root, runs, logScale) {
  root.replaceChildren();
  const steps = [...new Set(runs.flatMap((run) => run.points.map((p) => p.step)))].sort((a, b) => a - b);
  const at = new Map(steps.map((step, i) => [step, i]));
  const data = [steps, ...runs.map(() => steps.map(() => null))];
  runs.forEach((run, r) => { for (const p of run.points) data[r + 1][at.get(p.step)] = p.loss; });
  const box = document.createElement("div");
  box.className = "chart";
  box.id = "chart-compare";
  box.setAttribute("role", "img");
  box.tabIndex = 0;
  box.setAttribute("aria-label", `training loss of ${runs.length} runs against step`);
  box.setAttribute("data-series", String(runs.length));
  root.append(box);
  return new uPlot(options("training loss", "nats/token", runs.map((run) => run.name), logScale, fitWidth(root)),
                   data, box);
}

// Rows per token-length bin as bars: `bins` is [{start, end, count}] from the dataset report.
export function histogram(root, bins) {
  root.replaceChildren();
  const box = document.createElement("div");
  box.className = "chart";
  box.id = "chart-histogram";
  box.setAttribute("role", "img");
  box.tabIndex = 0;
  box.setAttribute("aria-label", `rows per token length, ${bins.length} bins`);
  box.setAttribute("data-bins", String(bins.length));
  root.append(box);
  const bars = uPlot.paths.bars({ size: [0.9, 40] });
  const opts = {
    title: "token lengths", width: fitWidth(root), height: HEIGHT,
    scales: { x: { time: false } },
    axes: [{ label: "tokens (bin start)" }, { label: "rows", size: 50 }],
    series: [{ label: "tokens from" }, { label: "rows", fill: "#1a56db55", stroke: "#1a56db", paths: bars, points: { show: false } }],
  };
  return new uPlot(opts, [bins.map((b) => b.start), bins.map((b) => b.count)], box);
}

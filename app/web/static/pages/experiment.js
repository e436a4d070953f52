// One experiment (#/experiments/<id>): status with a timeline, live charts over its own event stream,
// log tail, hyperparameters, lineage, artifacts (the model card rendered as text-safe Markdown) and the
// actions its state allows: stop, pause, start/resume, clone, deploy.

import { api, canWrite, events, post, state } from "../api.js";
import { MetricCharts } from "../charts.js";
import { $, bytes, button, flash, h, link, short, showError, table, when } from "../dom.js";
import { renderMarkdown } from "../markdown.js";
import { deploy } from "./experiments.js";

export const PAGE = "experiment";
const LINKS = { experiment: "#/experiments/", dataset: "#/datasets/", ab_test: "#/ab-tests/", deployment: "#/deployments/" };
const LOG_LINES = 40;
let charts = null;
let stream = null;
let shown = null;

export function setup() {
  if (charts) return;
  charts = new MetricCharts($("#charts"));
  $("#log-scale").addEventListener("change", (e) => charts.setLog(e.target.checked));
}

export function leave() {
  stream?.abort();
  shown = null;
}

export async function show(id) {
  const e = await api(`/api/experiments/${id}`);
  shown = e;
  $("#detail-title").textContent = e.name;
  showStatus(e);
  $("#detail-params").textContent = JSON.stringify(e.hyperparameters, null, 2);
  // What the dataset report warned of at submit (text only: it quotes the user's data).
  $("#detail-warnings").replaceChildren(...(e.warnings ?? []).map((w) => h("li", { text: `warning: ${w}` })));
  $("#timeline").replaceChildren();
  charts.reset([]);
  follow(e);
  await Promise.all([showLineage(id), showArtifacts(e)]);
}

// Its event stream from the first event: a finished run replays and ends, a running one keeps adding.
function follow(e) {
  stream?.abort();
  stream = new AbortController();
  const signal = stream.signal;
  (async () => {
    try {
      for await (const event of events(`/api/experiments/${e.id}/events`, signal)) {
        const data = JSON.parse(event.data);
        if (event.event === "metrics") charts.add(data);
        else if (event.event === "status") {
          step(`${data.status}${data.error ? `: ${data.error}` : ""}`, data.created_at);
          // Re-read the run only on a change newer than what was loaded (not on the replayed history).
          const latest = e.finished_at ?? e.started_at ?? e.created_at;
          if (data.status !== shown?.status && shown?.id === e.id && Date.parse(data.created_at) > Date.parse(latest)) await refresh(e.id);
        } else if (event.event === "checkpoint") step(`checkpoint at step ${data.step ?? "?"}`, data.created_at);
      }
    } catch (error) { if (!signal.aborted) showError(error); }
  })();
}

function step(text, at) {
  $("#timeline").append(h("li", {}, h("time", { datetime: at ?? "", text: when(at) }), " ", text));
}

async function refresh(id) {
  const e = await api(`/api/experiments/${id}`);
  if (shown?.id !== id) return;
  shown = e;
  showStatus(e);
  if (["succeeded", "failed", "cancelled", "paused"].includes(e.status)) await showArtifacts(e);
}

function showStatus(e) {
  $("#detail-status").textContent = `${e.status}, attempt ${e.attempt}, ${short(e.base_model)}` +
    `${e.fine_tuned_model ? `, answers to ${e.fine_tuned_model}` : ""}${e.error ? ` — ${e.error}` : ""}`;
  // Why a queued run cannot start (no live worker of its class, or none with its GPUs): text only.
  $("#detail-waiting").textContent = e.waiting_reason ? `waiting: ${e.waiting_reason}` : "";
  $("#log-tail").textContent = e.log_tail ?? "(no log yet)";
  $("#detail-actions").replaceChildren(...(canWrite() ? actions(e) : []));
}

function actions(e) {
  const act = (label, path, done, body) => button(label, async () => { await done(await post(path, body)); });
  const reload = () => refresh(e.id);
  const list = [];
  if (e.status === "queued" || e.status === "running") {
    list.push(act("Stop", `/api/experiments/${e.id}/stop`, reload), act("Pause", `/api/experiments/${e.id}/pause`, reload));
  }
  if (["paused", "cancelled", "failed"].includes(e.status)) {
    list.push(act(e.status === "paused" ? "Resume" : "Start again", `/api/experiments/${e.id}/start`, reload));
  }
  list.push(act("Clone", `/api/experiments/${e.id}/clone`, (clone) => {
    location.hash = `#/experiments/${clone.id}`;
    flash(`cloned as ${clone.name}`);
  }, {}));
  if (e.status === "succeeded") list.push(button("Deploy", () => deploy(e.id)));
  return list;
}

async function showLineage(id) {
  const lineage = await api(`/api/experiments/${id}/lineage`);
  const label = new Map(lineage.nodes.map((n) => [n.id, n]));
  const node = (key) => {
    const n = label.get(key);
    const [kind, ref] = key.split(/:(.*)/s);
    const text = `${kind.replace("_", " ")} ${n?.label ?? ref}`;
    if (kind === "experiment" && ref === id) return h("strong", { text: `this run (${n?.label ?? ref})` });
    return LINKS[kind] ? link(LINKS[kind] + ref, text) : text;
  };
  $("#lineage").replaceChildren(...lineage.edges.map((edge) =>
    h("li", {}, node(edge.source), ` ${edge.relation.replaceAll("_", " ")} `, node(edge.target))));
  if (!lineage.edges.length) $("#lineage").append(h("li", { text: "no links yet" }));
}

async function showArtifacts(e) {
  const artifacts = await api(`/api/experiments/${e.id}/artifacts`);
  $("#artifacts").replaceChildren(table("Artifacts", ["file", "size", ""], artifacts.data, (a) =>
    [a.path, bytes(a.size_bytes), button("Download", () => download(e.id, a.path), { "aria-label": `download ${a.path}` })]));
  const log = artifacts.data.find((a) => a.path === "train.log");
  if (!e.log_tail && log) $("#log-tail").textContent = (await text(e.id, log.path)).split("\n").slice(-LOG_LINES).join("\n");
  const card = artifacts.data.find((a) => a.path === "README.md") ?? artifacts.data.find((a) => a.path.endsWith("README.md"));
  $("#model-card").replaceChildren(card ? renderMarkdown(await text(e.id, card.path)) : h("p", { text: "no model card yet" }));
}

async function fetchArtifact(id, path) {
  const response = await fetch(`/api/experiments/${id}/artifacts/${path.split("/").map(encodeURIComponent).join("/")}`,
                               { headers: { Authorization: `Bearer ${state.token}`, "X-Team-Id": state.team } });
  if (!response.ok) throw new Error(`${response.status}: artifact ${path}`);
  return response;
}

const text = async (id, path) => (await fetchArtifact(id, path)).text();

// A download needs the Authorization header, so it goes through a blob URL instead of a plain link.
async function download(id, path) {
  const blob = await (await fetchArtifact(id, path)).blob();
  const url = URL.createObjectURL(blob);
  h("a", { href: url, download: path.split("/").pop() }).click();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

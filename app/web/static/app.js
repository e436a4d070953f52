// Fine-Tuning Studio web UI: a thin client of the REST API. Data is only ever put in the page with
// textContent (never as HTML), and the login token lives in sessionStorage for this tab.

import { MetricCharts, compareLoss } from "./charts.js";
import { buildHyperparameterFields, readHyperparameters, showFieldError } from "./form.js";

const state = { token: sessionStorage.getItem("studio-token"), team: null, roles: new Map(), experiments: new Map(),
                flash: null, compare: new Set() };
const $ = (selector) => document.querySelector(selector);

// ------------------------------------------------------------------ API

async function api(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  if (state.token) headers.Authorization = `Bearer ${state.token}`;
  if (state.team) headers["X-Team-Id"] = state.team;
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) { logout(); throw new Error("session expired: log in again"); }
  const body = response.status === 204 ? null : await response.json().catch(() => null);
  if (!response.ok) {
    const error = new Error(describe(response.status, body));
    error.field = fieldOf(body);
    throw error;
  }
  return body;
}

// The request field an error names: our 4xx's `field`, or the first location of a schema error.
function fieldOf(body) {
  if (typeof body?.field === "string") return body.field;
  const first = Array.isArray(body?.detail) ? body.detail[0] : null;
  return first ? first.loc.slice(1).join(".") : null;
}

function describe(status, body) {
  const detail = body?.error?.message ?? body?.detail;
  if (Array.isArray(detail)) return `${status}: ${detail[0].loc.slice(1).join(".")}: ${detail[0].msg}`;
  return `${status}: ${detail ?? "request failed"}`;
}

// Server-sent events over fetch, so the Authorization header goes along (EventSource cannot send it).
async function* events(path, signal) {
  const headers = { Authorization: `Bearer ${state.token}`, Accept: "text/event-stream" };
  const response = await fetch(path, { headers, signal });
  if (!response.ok) throw new Error(`${response.status}: ${path}`);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replaceAll("\r\n", "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const event = { event: "message", data: "" };
      for (const line of block.split("\n")) {
        const [field, ...rest] = line.split(":");
        const text = rest.join(":").replace(/^ /, "");
        if (field === "event") event.event = text;
        else if (field === "data") event.data += text;
        else if (field === "id") event.id = text;
      }
      if (event.data) yield event;
    }
  }
}

function showError(error) { $("#error").textContent = error ? String(error.message ?? error) : ""; }
function cell(row, text, className) {
  const td = row.insertCell();
  td.textContent = text ?? "";
  if (className) td.className = className;
  return td;
}
function button(label, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.addEventListener("click", () => onClick().catch(showError));
  return b;
}
function option(select, value, label) {
  const o = document.createElement("option");
  o.value = value;
  o.textContent = label ?? value;
  select.append(o);
}

// ------------------------------------------------------------------ login and navigation

// Viewers read; the server refuses their writes anyway, so the page does not offer them.
function selectTeam(id) {
  state.team = id;
  document.body.classList.toggle("viewer", state.roles.get(id) === "viewer");
}
const canWrite = () => !document.body.classList.contains("viewer");

async function login(event) {
  event.preventDefault();
  $("#login-error").textContent = "";
  const response = await fetch("/api/auth/login", { method: "POST", body: new URLSearchParams(new FormData(event.target)) });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) { $("#login-error").textContent = body.detail ?? "login failed"; return; }
  state.token = body.access_token;
  sessionStorage.setItem("studio-token", state.token);
  await start();
}

function logout() {
  sessionStorage.removeItem("studio-token");
  state.token = null;
  stream?.abort();
  $("#app").hidden = true;
  $("#login").hidden = false;
}

async function start() {
  const me = await api("/api/users/me");
  $("#me").textContent = me.email;
  const teams = $("#team");
  teams.replaceChildren();
  for (const team of me.teams) option(teams, team.id, `${team.name} (${team.role})`);
  state.roles = new Map(me.teams.map((t) => [t.id, t.role]));
  selectTeam(me.teams[0]?.id ?? null);
  $("#login").hidden = true;
  $("#app").hidden = false;
  await route();
  followTeam();
}

const pages = { experiments: loadExperiments, datasets: loadDatasets, deployments: loadDeployments, playground: loadPlayground };

async function route() {
  const name = location.hash.slice(1) in pages ? location.hash.slice(1) : "experiments";
  for (const key of Object.keys(pages)) $(`#page-${key}`).hidden = key !== name;
  showError(state.flash);  // a message meant for the page we are going to
  state.flash = null;
  await pages[name]().catch(showError);
}

// ------------------------------------------------------------------ experiments (live)

async function loadExperiments() {
  const [experiments, datasets, recipes, schema] = await Promise.all([
    api("/api/experiments/?limit=100"), api("/api/datasets/?limit=500"), api("/api/recipes/"),
    api("/api/recipes/hyperparameters"),
  ]);
  if (!$("#hyperparameters").children.length) buildHyperparameterFields($("#hyperparameters"), schema);
  const datasetSelect = $("#submit-form [name=dataset_id]");
  datasetSelect.replaceChildren();
  for (const d of datasets.data) option(datasetSelect, d.id, `${d.name} (${d.row_count} rows)`);
  const recipeSelect = $("#submit-form [name=recipe]");
  recipeSelect.replaceChildren();
  option(recipeSelect, "", "no recipe");
  for (const r of recipes.data) option(recipeSelect, r.name, r.name);
  state.experiments = new Map(experiments.data.map((e) => [e.id, e]));
  renderExperiments();
}

function renderExperiments() {
  const body = $("#experiments tbody");
  body.replaceChildren();
  for (const e of state.experiments.values()) {
    const row = body.insertRow();
    row.dataset.id = e.id;
    const pick = document.createElement("input");
    pick.type = "checkbox";
    pick.checked = state.compare.has(e.id);
    pick.setAttribute("aria-label", `compare ${e.name}`);
    pick.addEventListener("change", () => { if (pick.checked) state.compare.add(e.id); else state.compare.delete(e.id); });
    row.insertCell().append(pick);
    cell(row, e.name);
    cell(row, e.status, `status status-${e.status}`);
    cell(row, e.base_model.split("/").slice(-2).join("/"));
    cell(row, e.created_at.slice(0, 19).replace("T", " "));
    const actions = row.insertCell();
    actions.append(button("Details", () => showExperiment(e.id)));
    if (!canWrite()) continue;
    if (e.status === "queued" || e.status === "running") {
      actions.append(button("Stop", async () => { await api(`/api/experiments/${e.id}/stop`, { method: "POST" }); }));
    }
    if (e.status === "succeeded") {
      actions.append(button("Deploy", async () => {
        const d = await api("/api/deployments/", { method: "POST", headers: { "Content-Type": "application/json" },
                                                   body: JSON.stringify({ experiment_id: e.id }) });
        state.flash = `deployed as ${d.model}`;
        location.hash = "#deployments";
      }));
    }
  }
}

async function submitExperiment(event) {
  event.preventDefault();
  const form = new FormData(event.target);
  const body = { name: form.get("name"), base_model: form.get("base_model"), dataset_id: form.get("dataset_id"),
                 recipe: form.get("recipe") || null, hyperparameters: readHyperparameters($("#hyperparameters")) };
  try {
    const created = await api("/api/experiments/", { method: "POST", headers: { "Content-Type": "application/json" },
                                                     body: JSON.stringify(body) });
    state.experiments = new Map([[created.id, created], ...state.experiments]);
    renderExperiments();
    showFieldError(event.target, null);
    showError(null);
  } catch (error) {
    showFieldError(event.target, error.field, error.message);
    showError(error);
  }
}

// The open experiment's metrics arrive over its own event stream (from the first event: a finished run
// replays and ends; a running one keeps adding points as it logs them).
const charts = new MetricCharts($("#charts"));
let detailStream = null;

async function showExperiment(id) {
  const e = await api(`/api/experiments/${id}`);
  $("#experiment-detail").hidden = false;
  $("#detail-title").textContent = e.name;
  showStatus(e);
  $("#detail-params").textContent = JSON.stringify(e.hyperparameters, null, 2);
  // What the dataset report warned of at submit (text only: it quotes the user's data).
  $("#detail-warnings").replaceChildren(...(e.warnings ?? []).map((warning) => {
    const item = document.createElement("li");
    item.textContent = `warning: ${warning}`;
    return item;
  }));
  charts.reset([]);
  detailStream?.abort();
  detailStream = new AbortController();
  const signal = detailStream.signal;
  (async () => {
    try {
      for await (const event of events(`/api/experiments/${id}/events`, signal)) {
        if (event.event === "metrics") charts.add(JSON.parse(event.data));
        else if (event.event === "status") showStatus({ ...e, ...JSON.parse(event.data), waiting_reason: null });
      }
    } catch (error) { if (!signal.aborted) showError(error); }
  })();
}

function showStatus(e) {
  $("#detail-status").textContent = `${e.status}, attempt ${e.attempt}${e.error ? ` — ${e.error}` : ""}`;
  // Why a queued run cannot start (no live worker of its class, or none with its GPUs): text only.
  $("#detail-waiting").textContent = e.waiting_reason ? `waiting: ${e.waiting_reason}` : "";
}

async function compareSelected() {
  const ids = [...state.compare];
  if (ids.length < 2) { showError("tick two or more experiments to compare"); return; }
  const runs = await Promise.all(ids.map(async (id) => {
    const metrics = await api(`/api/experiments/${id}/metrics?limit=10000`);
    const points = metrics.data.filter((m) => "loss" in m.data).map((m) => ({ step: m.data.step, loss: m.data.loss }));
    return { name: state.experiments.get(id)?.name ?? id, points };
  }));
  $("#compare").hidden = false;
  compareLoss($("#compare-chart"), runs, $("#log-scale").checked);
  showError(null);
}

// The team's live channel: every experiment state change, pushed by the server.
let stream = null;
async function followTeam() {
  stream?.abort();
  stream = new AbortController();
  const signal = stream.signal;
  while (!signal.aborted && state.token) {
    try {
      $("#live").classList.add("on");
      for await (const event of events(`/api/teams/${state.team}/events`, signal)) {
        const change = JSON.parse(event.data);
        const known = state.experiments.get(change.experiment_id);
        if (known) known.status = change.status;
        else state.experiments = new Map([[change.experiment_id, await api(`/api/experiments/${change.experiment_id}`)],
                                          ...state.experiments]);
        if (!$("#page-experiments").hidden) renderExperiments();
      }
    } catch (error) {
      if (signal.aborted) return;
    }
    $("#live").classList.remove("on");
    await new Promise((resolve) => setTimeout(resolve, 2000));  // reconnect
  }
}

// ------------------------------------------------------------------ datasets, deployments, playground

async function loadDatasets() {
  const datasets = await api("/api/datasets/?limit=500");
  const body = $("#datasets tbody");
  body.replaceChildren();
  for (const d of datasets.data) {
    const row = body.insertRow();
    cell(row, d.name); cell(row, d.format); cell(row, d.row_count);
    cell(row, `${d.train_rows} / ${d.eval_rows}`); cell(row, d.created_at.slice(0, 19).replace("T", " "));
  }
}

async function uploadDataset(event) {
  event.preventDefault();
  const form = new FormData(event.target);
  if (!form.get("name")) form.delete("name");
  try {
    await api("/api/datasets/upload", { method: "POST", body: form });
    event.target.reset();
    showError(null);
    await loadDatasets();
  } catch (error) { showError(error); }
}

async function loadDeployments() {
  const deployments = await api("/api/deployments/");
  const body = $("#deployments tbody");
  body.replaceChildren();
  for (const d of deployments.data) {
    const row = body.insertRow();
    cell(row, d.model); cell(row, d.base_model.split("/").slice(-2).join("/"));
    cell(row, d.experiment_id ?? "—"); cell(row, d.status);
    const actions = row.insertCell();
    if (d.status === "active" && canWrite()) {
      actions.append(button("Retire", async () => { await api(`/api/deployments/${d.id}`, { method: "DELETE" });
                                                     await loadDeployments(); }));
    }
  }
}

async function loadPlayground() {
  const deployments = await api("/api/deployments/?status=active");
  const select = $("#chat-form [name=model]");
  select.replaceChildren();
  for (const d of deployments.data) option(select, d.model);
}

async function chat(event) {
  event.preventDefault();
  const form = new FormData(event.target);
  const output = $("#chat-output");
  output.textContent = "";
  const body = { model: form.get("model"), messages: [{ role: "user", content: form.get("message") }],
                 max_tokens: Number(form.get("max_tokens")), stream: true };
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", body: JSON.stringify(body),
      headers: { "Content-Type": "application/json", Authorization: `Bearer ${state.token}`, "X-Team-Id": state.team },
    });
    if (!response.ok) throw new Error(describe(response.status, await response.json().catch(() => null)));
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      const lines = buffer.split("\n");
      buffer = lines.pop();
      for (const raw of lines) {
        const line = raw.trim();
        if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
        const chunk = JSON.parse(line.slice(6));
        if (chunk.error) throw new Error(chunk.error.message);
        output.textContent += chunk.choices?.[0]?.delta?.content ?? "";
      }
    }
    output.dataset.done = "true";
  } catch (error) { showError(error); }
}

// ------------------------------------------------------------------ wiring

$("#login-form").addEventListener("submit", (e) => login(e).catch((err) => { $("#login-error").textContent = err.message; }));
$("#logout").addEventListener("click", logout);
$("#team").addEventListener("change", async (e) => { selectTeam(e.target.value); await route(); followTeam(); });
$("#submit-form").addEventListener("submit", submitExperiment);
$("#log-scale").addEventListener("change", (e) => charts.setLog(e.target.checked));
$("#compare-button").addEventListener("click", () => compareSelected().catch(showError));
$("#upload-form").addEventListener("submit", uploadDataset);
$("#chat-form").addEventListener("submit", chat);
window.addEventListener("hashchange", route);

if (state.token) start().catch(logout); else $("#login").hidden = false;

// Deployments: what is served, where each base model is placed and whether it is loaded, and its request
// and token rates over the last minutes (all API replicas); deploy a base model, retire a deployment.

import { api, canWrite, post } from "../api.js";
import { $, button, facts as pairs, flash, h, link, number, onSubmit, short, table, when } from "../dom.js";

export const PAGE = "deployments";
const REFRESH_MS = 3000;  // placement and rates change without an event: the open page re-reads them
let timer = null;
const every = (fn) => { clearInterval(timer); timer = setInterval(() => fn().catch(() => {}), REFRESH_MS); };
export function leave() { clearInterval(timer); }

export function setup() {
  if (setup.done) return;
  setup.done = true;
  onSubmit($("#deploy-form"), async (form) => {
    const d = await post("/api/deployments/", { base_model: form.get("base_model"), replicas: Number(form.get("replicas") || 1) });
    flash(`deployed as ${d.model}`);
    $("#deploy-form").reset();
    await render();
  });
}

export async function show() {
  every(render);
  await render();
}

async function render() {
  const deployments = await api("/api/deployments/?limit=200");
  const status = new Map(await Promise.all(deployments.data.filter((d) => d.status === "active").map(async (d) =>
    [d.id, await api(`/api/deployments/${d.id}/status`).catch(() => null)])));
  $("#deployments").replaceChildren(table("Deployments",
    ["model", "base model", "experiment", "status", "placement", "requests/min", "tokens/s", ""], deployments.data, (d) => {
      const s = status.get(d.id);
      const placed = s ? s.placement.map((p) => `${p.worker}: ${p.state}`).join(", ") || `not placed (${s.workers_alive} workers up)` : "—";
      const actions = h("td", { class: "actions" });
      if (d.status === "active" && canWrite()) {
        actions.append(button("Retire", async () => { await api(`/api/deployments/${d.id}`, { method: "DELETE" }); await render(); },
                              { "aria-label": `retire ${d.model}` }));
      }
      return [h("td", { class: "mono" }, link(`#/deployments/${d.id}`, d.model)), short(d.base_model),
              d.experiment_id ? link(`#/experiments/${d.experiment_id}`, "run") : "—",
              h("td", { class: `status status-${d.status}`, text: d.status }), placed,
              s?.usage ? number(s.usage.requests_per_minute) : "—", s?.usage ? number(s.usage.completion_tokens_per_second) : "—",
              actions];
    }));
}

// ------------------------------------------------------------------ one deployment

export const detail = { PAGE: "deployment", show: (id) => { every(() => showDeployment(id)); return showDeployment(id); }, leave };

async function showDeployment(id) {
  const [d, s] = await Promise.all([api(`/api/deployments/${id}`), api(`/api/deployments/${id}/status`)]);
  $("#deployment-title").textContent = d.model;
  const facts = [["status", d.status], ["base model", d.base_model], ["replicas", d.replicas], ["created", when(d.created_at)],
                 ["workers up", s.workers_alive], ["loaded on", s.loaded_on.join(", ") || "no worker yet"]];
  if (d.experiment_id) facts.push(["trained by", link(`#/experiments/${d.experiment_id}`, "its run")]);
  $("#deployment-facts").replaceChildren(...pairs(facts));
  $("#deployment-chat").href = `#/playground/${encodeURIComponent(d.model)}`;
  $("#deployment-chat").hidden = d.status !== "active";
  $("#deployment-placement").replaceChildren(table("Placement", ["worker", "state", "placed", "ready", "load time (s)"], s.placement,
    (p) => [p.worker, p.state, when(p.placed_at), when(p.ready_at), number(p.load_seconds)]));
  const u = s.usage;
  const usage = [["requests", `${u.requests} (${number(u.requests_per_minute)} per minute)`], ["errors", u.errors],
                 ["prompt tokens", u.prompt_tokens], ["completion tokens", `${u.completion_tokens} (${number(u.completion_tokens_per_second)} per second)`]];
  $("#deployment-usage").replaceChildren(...pairs(usage));
}

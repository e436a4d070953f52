// Deployments: what is served, where each base model is placed and whether it is loaded, and its request
// and token rates over the last minutes (all API replicas); deploy a base model, retire a deployment.

import { api, canWrite, post } from "../api.js";
import { $, button, flash, h, link, number, onSubmit, short, table } from "../dom.js";

export const PAGE = "deployments";

export function setup() {
  if (setup.done) return;
  setup.done = true;
  onSubmit($("#deploy-form"), async (form) => {
    const d = await post("/api/deployments/", { base_model: form.get("base_model"), replicas: Number(form.get("replicas") || 1) });
    flash(`deployed as ${d.model}`);
    $("#deploy-form").reset();
    await show();
  });
}

export async function show() {
  const deployments = await api("/api/deployments/?limit=200");
  const status = new Map(await Promise.all(deployments.data.filter((d) => d.status === "active").map(async (d) =>
    [d.id, await api(`/api/deployments/${d.id}/status`).catch(() => null)])));
  $("#deployments").replaceChildren(table("Deployments",
    ["model", "base model", "experiment", "status", "placement", "requests/min", "tokens/s", ""], deployments.data, (d) => {
      const s = status.get(d.id);
      const placed = s ? s.placement.map((p) => `${p.worker}: ${p.state}`).join(", ") || `not placed (${s.workers_alive} workers up)` : "—";
      const actions = h("td", { class: "actions" });
      if (d.status === "active" && canWrite()) {
        actions.append(button("Retire", async () => { await api(`/api/deployments/${d.id}`, { method: "DELETE" }); await show(); },
                              { "aria-label": `retire ${d.model}` }));
      }
      return [h("td", { class: "mono", text: d.model }), short(d.base_model),
              d.experiment_id ? link(`#/experiments/${d.experiment_id}`, "run") : "—",
              h("td", { class: `status status-${d.status}`, text: d.status }), placed,
              s?.usage ? number(s.usage.requests_per_minute) : "—", s?.usage ? number(s.usage.completion_tokens_per_second) : "—",
              actions];
    }));
}

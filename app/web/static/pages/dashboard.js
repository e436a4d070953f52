// Dashboard: the team's experiments by status, its recent runs, and (for platform admins) the fleet at a
// glance: every live training and inference worker with its job or models and its heartbeat.

import { api, state } from "../api.js";
import { $, h, link, short, table, when } from "../dom.js";

export const PAGE = "dashboard";
const GROUPS = [["running", ["running"]], ["queued", ["created", "queued", "paused"]], ["succeeded", ["succeeded"]],
                ["failed or cancelled", ["failed", "cancelled"]]];

export async function show() {
  const counts = await Promise.all(GROUPS.map(async ([, statuses]) => {
    const pages = await Promise.all(statuses.map((s) => api(`/api/experiments/?status=${s}&limit=1`)));
    return pages.reduce((sum, page) => sum + page.count, 0);
  }));
  $("#counts").replaceChildren(...GROUPS.map(([label], i) =>
    h("a", { class: "card", href: "#/experiments", id: `count-${label.split(" ")[0]}` },
      h("span", { class: "count", text: counts[i] }), h("span", { text: label }))));
  const recent = await api("/api/experiments/?limit=8");
  $("#recent").replaceChildren(table("Recent runs", ["name", "status", "base model", "created"], recent.data, (e) =>
    [link(`#/experiments/${e.id}`, e.name), h("td", { class: `status status-${e.status}`, text: e.status }), short(e.base_model),
     when(e.created_at)]));
  $("#fleet-section").hidden = !state.me?.is_superuser;
  if (state.me?.is_superuser) await showFleet();
}

export async function onChange() { await show(); }

async function showFleet() {
  const fleet = await api("/admin/fleet");
  const rows = [...(fleet.training ?? []).map((w) => ({ ...w, kind: "training" })),
                ...(fleet.inference ?? []).map((w) => ({ ...w, kind: "inference" }))];
  $("#fleet").replaceChildren(table("Fleet", ["worker", "kind", "queue", "state", "work", "heartbeat"], rows, (w) =>
    [w.name, w.kind, w.queue ?? (w.queues ?? []).join(", "), w.state, work(w), `${Math.round(w.heartbeat_age_s ?? 0)} s ago`]));
}

function work(w) {
  if (w.kind === "training") return w.job ? `experiment ${w.job.experiment_id.slice(0, 8)} on ${w.job.gpus} GPU(s)` : "idle";
  const models = (w.models ?? []).map(short).join(", ") || "no model loaded";
  return `${models}; ${w.adapters?.length ?? 0} adapters; ${w.requests_in_flight ?? 0} requests in flight`;
}

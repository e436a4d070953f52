// Admin (team admins and platform admins): members and their roles, invitations (the token shown once),
// API keys (the key shown once; only its hash is stored), the team's quotas, teams (platform admins)
// and the audit log.

import { api, post, state } from "../api.js";
import { $, button, flash, h, onSubmit, option, table, when } from "../dom.js";

export const PAGE = "admin";
const ROLES = ["viewer", "trainer", "admin"];
const base = () => `/api/teams/${state.team}`;

export function setup() {
  if (setup.done) return;
  setup.done = true;
  onSubmit($("#invite-form"), async (form) => {
    const invite = await post(`${base()}/invitations`, { email: form.get("email"), role: form.get("role") });
    $("#invite-token").textContent = `invitation token for ${invite.email} (shown once): ${invite.token}`;
    $("#invite-form").reset();
    await show();
  });
  onSubmit($("#key-form"), async (form) => {
    const key = await post(`${base()}/api-keys/`, { name: form.get("name"), role: form.get("role") });
    $("#new-key").textContent = `API key ${key.name} (shown once, copy it now): ${key.key}`;
    $("#key-form").reset();
    await show();
  });
  onSubmit($("#quota-form"), async (form) => {
    const body = {};
    for (const [name, value] of form.entries()) body[name] = value === "" ? null : Number(value);
    await api(`${base()}/quota`, { method: "PUT", json: body });
    flash("quotas saved");
  });
  onSubmit($("#team-form"), async (form) => {
    const team = await post("/api/teams/", { name: form.get("name") });
    flash(`created team ${team.name}`);
    $("#team-form").reset();
    await show();
  });
}

export async function show() {
  const [team, members, invitations, keys, audit] = await Promise.all([
    api(base()), api(`${base()}/members`), api(`${base()}/invitations`), api(`${base()}/api-keys/`),
    api(`${base()}/audit/?limit=50`),
  ]);
  $("#admin-team").textContent = team.name;
  for (const name of ["max_active_jobs", "max_queued_jobs", "max_inflight_requests"]) $(`#quota-form [name=${name}]`).value = team[name];
  $("#members").replaceChildren(table("Members", ["email", "name", "role", "joined", ""], members.data, (m) => {
    const select = h("select", { "aria-label": `role of ${m.email}`, onchange: (e) => changeRole(m, e.target.value).catch((err) => { e.target.value = m.role; $("#error").textContent = err.message; }) });
    for (const role of ROLES) option(select, role);
    select.value = m.role;
    return [m.email, m.full_name, select, when(m.created_at),
            button("Remove", async () => { await api(`${base()}/members/${m.user_id}`, { method: "DELETE" }); await show(); },
                   { "aria-label": `remove ${m.email}` })];
  }));
  $("#invitations").replaceChildren(table("Invitations", ["email", "role", "expires", "accepted", ""], invitations.data, (i) =>
    [i.email, i.role, when(i.expires_at), when(i.accepted_at),
     i.accepted_at ? "" : button("Revoke", async () => { await api(`${base()}/invitations/${i.id}`, { method: "DELETE" }); await show(); },
                                 { "aria-label": `revoke invitation of ${i.email}` })]));
  $("#api-keys").replaceChildren(table("API keys", ["name", "role", "prefix", "last used", "revoked", ""], keys.data, (k) =>
    [k.name, k.role, h("td", { class: "mono", text: `${k.prefix}…` }), when(k.last_used_at), when(k.revoked_at),
     k.revoked_at ? "" : button("Revoke", async () => { await api(`${base()}/api-keys/${k.id}`, { method: "DELETE" }); await show(); },
                                { "aria-label": `revoke key ${k.name}` })]));
  $("#audit").replaceChildren(table("Audit log", ["when", "action", "target", "details"], audit.data, (a) =>
    [when(a.created_at), a.action, `${a.target_type} ${a.target_id.slice(0, 8)}`, JSON.stringify(a.data).slice(0, 200)]));
  $("#teams-section").hidden = !state.me?.is_superuser;
  if (state.me?.is_superuser) {
    const teams = await api("/api/teams/");
    $("#teams").replaceChildren(table("Teams", ["name", "active jobs", "queued jobs", "in-flight requests", "created"], teams.data,
      (t) => [t.name, t.max_active_jobs, t.max_queued_jobs, t.max_inflight_requests, when(t.created_at)]));
  }
}

async function changeRole(member, role) {
  await api(`${base()}/members/${member.user_id}`, { method: "PATCH", json: { role } });
  flash(`${member.email} is now ${role}`);
}

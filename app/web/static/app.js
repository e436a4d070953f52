// Fine-Tuning Studio web UI: a thin client of the REST API with no build step. Each page is a module
// under pages/; this file logs in, routes #/page/<id> URLs to them (deep links, back button) and follows
// the team's live channel. Data is only ever put in the page as text (dom.js), never as HTML.

import { api, events, state } from "./api.js";
import { $, clearStaleFlash, option, showError } from "./dom.js";
import * as abTests from "./pages/ab_tests.js";
import * as admin from "./pages/admin.js";
import * as dashboard from "./pages/dashboard.js";
import * as datasets from "./pages/datasets.js";
import * as deployments from "./pages/deployments.js";
import * as experiment from "./pages/experiment.js";
import * as experiments from "./pages/experiments.js";
import * as playground from "./pages/playground.js";

// URL -> page: "#/experiments/<id>" shows the experiment page with that id.
const ROUTES = {
  "": dashboard, experiments, datasets, deployments, playground, "ab-tests": abTests, admin,
  "experiments/:id": experiment, "datasets/:id": datasets.detail, "ab-tests/:id": abTests.detail,
  "deployments/:id": deployments.detail, "playground/:id": playground,
};
const modules = [dashboard, experiments, experiment, datasets, datasets.detail, deployments, deployments.detail,
                 playground, abTests, abTests.detail, admin];
let current = null;

function resolve(hash) {
  const parts = hash.replace(/^#\/?/, "").split("/").filter(Boolean);
  const [name = "", id] = parts;
  if (id && ROUTES[`${name}/:id`]) return { page: ROUTES[`${name}/:id`], id: decodeURIComponent(id) };
  return { page: ROUTES[name] ?? dashboard, id: null };
}

async function route() {
  const { page, id } = resolve(location.hash);
  current?.leave?.();
  current = page;
  for (const m of modules) $(`#page-${m.PAGE}`).hidden = m !== page;
  for (const a of document.querySelectorAll("header nav a")) {
    const here = a.getAttribute("href") === `#/${location.hash.replace(/^#\/?/, "").split("/")[0]}`;
    if (here) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
  }
  showError(null);
  clearStaleFlash();
  await page.show(id).catch(showError);
}

// ------------------------------------------------------------------ login

function selectTeam(id) {
  state.team = id;
  const role = state.roles.get(id);
  document.body.classList.toggle("viewer", role === "viewer");
  $("#nav-admin").hidden = !(role === "admin" || state.me?.is_superuser);
}

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
  teamStream?.abort();
  current?.leave?.();
  $("#app").hidden = true;
  $("#login").hidden = false;
}
state.onLogout = logout;

async function start() {
  const me = await api("/api/users/me");
  state.me = me;
  $("#me").textContent = me.email;
  const teams = $("#team");
  teams.replaceChildren();
  for (const team of me.teams) option(teams, team.id, `${team.name} (${team.role})`);
  state.roles = new Map(me.teams.map((t) => [t.id, t.role]));
  selectTeam(me.teams[0]?.id ?? null);
  $("#login").hidden = true;
  $("#app").hidden = false;
  for (const m of modules) m.setup?.();
  await route();
  followTeam();
}

// ------------------------------------------------------------------ the team's live channel

// Every experiment state change of the team, pushed by the server; the open page decides what to redraw.
let teamStream = null;
async function followTeam() {
  teamStream?.abort();
  teamStream = new AbortController();
  const signal = teamStream.signal;
  while (!signal.aborted && state.token) {
    try {
      $("#live").classList.add("on");
      for await (const event of events(`/api/teams/${state.team}/events`, signal)) {
        const change = JSON.parse(event.data);
        await current?.onChange?.(change);
      }
    } catch (error) {
      if (signal.aborted) return;
    }
    $("#live").classList.remove("on");
    await new Promise((resolve) => setTimeout(resolve, 2000));  // reconnect
  }
}

// ------------------------------------------------------------------ wiring

$("#login-form").addEventListener("submit", (e) => login(e).catch((err) => { $("#login-error").textContent = err.message; }));
$("#logout").addEventListener("click", logout);
$("#team").addEventListener("change", async (e) => { selectTeam(e.target.value); await route(); followTeam(); });
window.addEventListener("hashchange", route);

if (state.token) start().catch(logout); else $("#login").hidden = false;

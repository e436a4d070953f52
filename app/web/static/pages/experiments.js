// Experiments: the new-experiment form (every hyperparameter generated from the API's schema, with its
// help text and errors at the field, and the report's memory/time estimate), the team's runs (live over
// the team channel) and a compare view that overlays several runs' loss on one chart.

import { api, canWrite, post } from "../api.js";
import { compareLoss } from "../charts.js";
import { $, button, flash, h, link, number, onSubmit, option, short, showError, table, when } from "../dom.js";
import { buildHyperparameterFields, readHyperparameters } from "../form.js";

export const PAGE = "experiments";
const runs = new Map();
const picked = new Set();
let recipes = [];

export function setup() {
  if (setup.done) return;
  setup.done = true;
  onSubmit($("#submit-form"), submit);
  $("#compare-button").addEventListener("click", () => compare().catch(showError));
  $("#exp-recipe").addEventListener("change", describeRecipe);
  for (const name of ["base_model", "dataset_id"]) $(`#submit-form [name=${name}]`).addEventListener("change", () => estimate().catch(() => {}));
}

export async function show() {
  const [experiments, datasets, recipeList, schema] = await Promise.all([
    api("/api/experiments/?limit=100"), api("/api/datasets/?limit=500"), api("/api/recipes/"),
    api("/api/recipes/hyperparameters"),
  ]);
  if (!$("#hyperparameters").children.length) buildHyperparameterFields($("#hyperparameters"), schema);
  const datasetSelect = $("#exp-dataset");
  const chosen = datasetSelect.value;
  datasetSelect.replaceChildren();
  for (const d of datasets.data) option(datasetSelect, d.id, `${d.name} (${d.row_count} rows)`);
  if (chosen) datasetSelect.value = chosen;
  recipes = recipeList.data;
  const recipeSelect = $("#exp-recipe");
  const recipe = recipeSelect.value;
  recipeSelect.replaceChildren();
  option(recipeSelect, "", "no recipe");
  for (const r of recipes) option(recipeSelect, r.name, r.name);
  recipeSelect.value = recipe;
  describeRecipe();
  runs.clear();
  for (const e of experiments.data) runs.set(e.id, e);
  render();
}

export async function onChange(change) {
  const known = runs.get(change.experiment_id);
  if (known) known.status = change.status;
  else runs.set(change.experiment_id, await api(`/api/experiments/${change.experiment_id}`));
  render();
}

function render() {
  const sorted = [...runs.values()].sort((a, b) => b.created_at.localeCompare(a.created_at));
  $("#experiments").replaceChildren(table("Experiments", ["compare", "name", "status", "base model", "created", ""], sorted, (e) => {
    const pick = h("input", { type: "checkbox", "aria-label": `compare ${e.name}`, checked: picked.has(e.id),
                              onchange: (ev) => (ev.target.checked ? picked.add(e.id) : picked.delete(e.id)) });
    return [pick, link(`#/experiments/${e.id}`, e.name), h("td", { class: `status status-${e.status}`, text: e.status }),
            short(e.base_model), when(e.created_at), actions(e)];
  }));
}

function actions(e) {
  const cell = h("td", { class: "actions" });
  if (!canWrite()) return cell;
  if (e.status === "queued" || e.status === "running") {
    cell.append(button("Stop", () => post(`/api/experiments/${e.id}/stop`)));  // the change arrives on the team channel
  }
  if (e.status === "succeeded") cell.append(button("Deploy", () => deploy(e.id)));
  return cell;
}

// Serve a succeeded run's adapter, then show the deployments (with its name in the confirmation).
export async function deploy(experimentId) {
  const d = await post("/api/deployments/", { experiment_id: experimentId });
  location.hash = "#/deployments";
  flash(`deployed as ${d.model}`);
}

function describeRecipe() {
  const recipe = recipes.find((r) => r.name === $("#exp-recipe").value);
  $("#recipe-help").textContent = recipe ? recipe.description : "the hyperparameters' defaults";
}

async function submit(form) {
  const body = { name: form.get("name"), base_model: form.get("base_model"), dataset_id: form.get("dataset_id"),
                 recipe: form.get("recipe") || null, hyperparameters: readHyperparameters($("#hyperparameters")) };
  const created = await post("/api/experiments/", body);
  runs.set(created.id, created);
  render();
  flash(`submitted ${created.name}`);
}

// The dataset report's estimate of peak memory and time for this model and dataset, when it can be made.
async function estimate() {
  const base = $("#exp-base").value.trim(), dataset = $("#exp-dataset").value;
  $("#estimate").textContent = "";
  if (!base || !dataset) return;
  const query = new URLSearchParams({ base_model: base, rows: "1" });
  const report = await api(`/api/datasets/${dataset}/report?${query}`);
  const e = report.estimate;
  if (!e) { $("#estimate").textContent = report.status === "pending" ? "estimate: the report is being computed" : ""; return; }
  const time = e.seconds_per_epoch ? `, about ${number(e.seconds_per_epoch / 60, 2)} min per epoch` : "";
  $("#estimate").textContent = `estimate: peak memory ${number(e.peak_memory_gib)} GiB${time} (${e.assumptions})`;
}

async function compare() {
  const ids = [...picked];
  if (ids.length < 2) { showError("tick two or more experiments to compare"); return; }
  const series = await Promise.all(ids.map(async (id) => {
    const metrics = await api(`/api/experiments/${id}/metrics?limit=10000`);
    const points = metrics.data.filter((m) => "loss" in m.data).map((m) => ({ step: m.data.step, loss: m.data.loss }));
    return { name: runs.get(id)?.name ?? id, points };
  }));
  $("#compare").hidden = false;
  compareLoss($("#compare-chart"), series, $("#log-scale-compare").checked);
  showError(null);
}

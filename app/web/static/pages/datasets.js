// Datasets: upload by drag-and-drop or file picker with progress (a refused file's error shown at the
// upload), the team's datasets, and one dataset's page (#/datasets/<id>): detected format, preview table
// and the dataset report for a base model (token histogram, truncation, duplicates, the label mask).

import { api, canWrite, upload } from "../api.js";
import { histogram } from "../charts.js";
import { $, bytes, button, facts as pairs, flash, h, link, number, onSubmit, showError, table, when } from "../dom.js";

export const PAGE = "datasets";
const MAX_CELL = 160;

export function setup() {
  if (setup.done) return;
  setup.done = true;
  const form = $("#upload-form"), zone = $("#drop-zone"), input = $("#upload-file");
  for (const type of ["dragenter", "dragover"]) zone.addEventListener(type, (e) => { e.preventDefault(); zone.classList.add("over"); });
  for (const type of ["dragleave", "drop"]) zone.addEventListener(type, () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    if (e.dataTransfer?.files.length) input.files = e.dataTransfer.files;
    zone.querySelector("span").textContent = input.files[0]?.name ?? zone.querySelector("span").textContent;
  });
  input.addEventListener("change", () => { zone.querySelector("span").textContent = input.files[0]?.name ?? ""; });
  form.addEventListener("submit", (e) => { e.preventDefault(); send(form).catch(showError); });
  onSubmit($("#report-form"), (data) => report(detail.id, data));
}

async function send(form) {
  const data = new FormData(form);
  if (!data.get("name")) data.delete("name");
  const progress = $("#upload-progress");
  progress.hidden = false;
  progress.value = 0;
  $("#upload-error").textContent = "";
  try {
    const created = await upload("/api/datasets/upload", data, (share) => { progress.value = share; });
    form.reset();
    flash(`uploaded ${created.name}: ${created.format}, ${created.row_count} rows`);
    await show();
  } catch (error) {
    $("#upload-error").textContent = error.message;  // at the upload, where the user is looking
  } finally {
    progress.hidden = true;
  }
}

export async function show() {
  const datasets = await api("/api/datasets/?limit=500");
  $("#datasets").replaceChildren(table("Datasets", ["name", "format", "rows", "train / eval", "size", "created"], datasets.data,
    (d) => [link(`#/datasets/${d.id}`, d.name), d.format, d.row_count, `${d.train_rows} / ${d.eval_rows}`, bytes(d.size_bytes),
            when(d.created_at)]));
}

// ------------------------------------------------------------------ one dataset

export const detail = {
  PAGE: "dataset",
  id: null,
  async show(id) {
    detail.id = id;
    $("#report").replaceChildren();
    const [d, preview] = await Promise.all([api(`/api/datasets/${id}`), api(`/api/datasets/${id}/preview`)]);
    $("#dataset-title").textContent = d.name;
    const facts = [["detected format", d.format], ["rows", `${d.row_count} (${d.train_rows} train, ${d.eval_rows} eval)`],
                   ["size", bytes(d.size_bytes)], ["created", when(d.created_at)], ["content hash", d.content_hash.slice(0, 16)]];
    if (d.parent_id) facts.push(["made from", link(`#/datasets/${d.parent_id}`, "its parent")]);
    $("#dataset-facts").replaceChildren(...pairs(facts));
    $("#dataset-preview").replaceChildren(previewTable(preview.rows));
    if (!canWrite()) return;
    $("#dataset-facts").append(...pairs([["delete", button("Delete dataset", async () => {
      await api(`/api/datasets/${id}`, { method: "DELETE" });
      location.hash = "#/datasets";
      flash(`deleted ${d.name}`);
    })]]));
  },
};

function previewTable(rows) {
  const columns = [...new Set(rows.flatMap((row) => Object.keys(row)))];
  const show = (value) => {
    const text = typeof value === "string" ? value : JSON.stringify(value);
    return text === undefined ? "" : text.length > MAX_CELL ? `${text.slice(0, MAX_CELL)}…` : text;
  };
  return table("Preview", columns, rows, (row) => columns.map((c) => show(row[c])));
}

async function report(id, form, tries = 0) {
  const query = new URLSearchParams({ base_model: form.get("base_model"), max_seq_length: form.get("max_seq_length") || "1024", rows: "3" });
  const { status, data } = await api(`/api/datasets/${id}/report?${query}`, { withStatus: true });
  if (status === 202 && tries < 60) {  // a worker computes a large dataset's report: ask again shortly
    $("#report").replaceChildren(h("p", { text: "the report is being computed…" }));
    await new Promise((resolve) => setTimeout(resolve, 2000));
    if (detail.id === id) await report(id, form, tries + 1);
    return;
  }
  $("#report").replaceChildren(...renderReport(data));
}

function renderReport(r) {
  const out = [];
  if (r.error) out.push(h("p", { class: "error", text: `report failed: ${r.error}` }));
  for (const b of r.blocking) out.push(h("p", { class: "error", text: `blocks training: ${b}` }));
  if (r.warnings.length) out.push(h("ul", { class: "warnings", "aria-label": "Report warnings" }, r.warnings.map((w) => h("li", { text: w }))));
  if (r.tokens) {
    const t = r.tokens;
    out.push(h("p", { id: "report-tokens", text: `tokens per row: mean ${number(t.mean)}, p50 ${t.p50}, p90 ${t.p90}, p99 ${t.p99}, max ${t.max}` }));
    const box = h("div", { class: "chart-box" });
    out.push(box);
    queueMicrotask(() => histogram(box, t.histogram));
  }
  if (r.truncation) {
    const cut = r.truncation;
    out.push(h("p", { id: "report-truncation", text: `longer than ${cut.max_seq_length} tokens (cut): ${cut.rows} rows ` +
      `(${number(100 * cut.share, 2)}%), ${cut.answer_cut_off} cut before their answer` }));
  }
  if (r.duplicates) {
    const d = r.duplicates;
    out.push(h("p", { id: "report-duplicates", text: `duplicates: ${d.exact_rows} exact, ${d.near_rows} near (rows ` +
      `${[...d.exact_groups.map((g) => g.join("="))].slice(0, 5).join(", ") || "none"})` }));
  }
  if (r.estimate) out.push(h("p", { text: `estimate: peak memory ${number(r.estimate.peak_memory_gib)} GiB` }));
  for (const row of r.rows) out.push(maskView(row));
  return out;
}

// A row as the trainer sees it: the tokens the loss trains on highlighted, the rest dimmed.
function maskView(row) {
  const box = h("figure", { class: "mask", "aria-label": `row ${row.row} with its loss mask` },
                h("figcaption", { text: `row ${row.row}: ${row.trained_tokens ?? "?"} trained tokens${row.problem ? ` — ${row.problem}` : ""}` }));
  const text = h("pre", { class: "mask-text", tabindex: 0 });
  if (row.tokens) for (const t of row.tokens) text.append(h("span", { class: t.trained ? "trained" : "context", text: t.text }));
  else text.textContent = row.rendered ?? "";
  box.append(text, h("p", { class: "legend" }, h("span", { class: "trained", text: "trained" }), " ", h("span", { class: "context", text: "context (no loss)" })));
  return box;
}

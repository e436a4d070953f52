// A/B tests: create one over two deployments (and a judge), the team's tests, the leaderboard of every
// vote; one test's page (#/ab-tests/<id>) runs the comparison, shows the answers side by side with the
// judge's verdicts, and takes blind votes (the two answers in random order, without the models' names).

import { api, canWrite, post } from "../api.js";
import { $, button, flash, h, link, number, onSubmit, option, table, when } from "../dom.js";

export const PAGE = "ab-tests";

export function setup() {
  if (setup.done) return;
  setup.done = true;
  onSubmit($("#ab-form"), async (form) => {
    const body = {
      name: form.get("name"), deployment_a: form.get("deployment_a"), deployment_b: form.get("deployment_b"),
      judge_deployment: form.get("judge_deployment") || null, max_tokens: Number(form.get("max_tokens")),
      prompts: form.get("prompts").split("\n").map((p) => p.trim()).filter(Boolean),
    };
    const created = await post("/api/ab-testing/", body);
    location.hash = `#/ab-tests/${created.id}`;
    flash(`created ${created.name}`);
  });
  $("#ab-run").addEventListener("click", () => run().catch((e) => { $("#ab-run").disabled = false; $("#error").textContent = e.message; }));
}

export async function show() {
  const [tests, deployments, board] = await Promise.all([
    api("/api/ab-testing/?limit=200"), api("/api/deployments/?status=active&limit=200"), api("/api/leaderboard"),
  ]);
  for (const [selector, none] of [["#ab-a", null], ["#ab-b", null], ["#ab-judge", "— no judge —"]]) {
    const select = $(selector);
    select.replaceChildren();
    if (none) option(select, "", none);
    for (const d of deployments.data) option(select, d.id, d.model);
  }
  if (deployments.data.length > 1) $("#ab-b").selectedIndex = 1;
  $("#ab-tests").replaceChildren(table("A/B tests", ["name", "prompts", "compared", "created"], tests.data,
    (t) => [link(`#/ab-tests/${t.id}`, t.name), t.prompts.length || "eval split", when(t.compared_at), when(t.created_at)]));
  $("#leaderboard").replaceChildren(table("Leaderboard", ["model", "rating", "95% interval", "wins", "losses", "ties", "votes"],
    board.data, (e) => [e.model, number(e.rating, 4), `${number(e.ci_low, 4)} – ${number(e.ci_high, 4)}`, e.wins, e.losses, e.ties, e.votes]));
}

// ------------------------------------------------------------------ one test

export const detail = { PAGE: "ab-test", id: null, show: showTest };

async function showTest(id) {
  detail.id = id;
  const t = await api(`/api/ab-testing/${id}`);
  $("#ab-title").textContent = t.name;
  $("#ab-summary").textContent = `${t.prompts.length || "the eval split's"} prompts, up to ${t.max_tokens} tokens each` +
    (t.compared_at ? `, compared ${when(t.compared_at)}` : ", not compared yet");
  $("#ab-run").disabled = false;
  renderResults(t);
  await showBallot(t);
}

async function run() {
  $("#ab-run").disabled = true;
  $("#ab-results").replaceChildren(h("p", { text: "running both models on every prompt…" }));
  const t = await post(`/api/ab-testing/${detail.id}/compare`);
  flash("compared");
  await showTest(t.id);
}

function renderResults(t) {
  const r = t.results;
  if (!r) { $("#ab-results").replaceChildren(h("p", { text: "run the comparison to see both models' answers" })); return; }
  const sides = table("Sides", ["side", "model", "mean latency (s)", "errors", "eval loss", "perplexity"], ["a", "b"], (k) =>
    [k.toUpperCase(), r[k].model, number(r[k].mean_latency_s), r[k].errors, number(r[k].eval_loss), number(r[k].perplexity)]);
  const judge = r.judge ? h("p", { id: "ab-judge-summary", text: `judge ${r.judge.model}: A wins ${number(100 * (r.judge.win_rate_a ?? 0), 3)}%, ` +
    `B wins ${number(100 * (r.judge.win_rate_b ?? 0), 3)}%, ${r.judge.ties} ties, ${r.judge.undecided} undecided` }) : null;
  const rows = table("Answers", ["prompt", "A", "B", "judge"], r.rows, (row) =>
    [row.prompt, row.a.text ?? `error: ${row.a.error}`, row.b.text ?? `error: ${row.b.error}`, row.judge ?? "—"]);
  rows.id = "ab-answers";
  $("#ab-results").replaceChildren(sides, judge ?? "", rows);
}

async function showBallot(t) {
  const box = $("#ballot");
  if (!t.compared_at) { box.replaceChildren(h("p", { text: "voting opens after the first comparison" })); return; }
  if (!canWrite()) { box.replaceChildren(h("p", { text: "viewers do not vote" })); return; }
  const b = await api(`/api/ab-testing/${t.id}/ballot`);
  const vote = (choice) => async () => {
    const [answerA, answerB] = b.first_side === "a" ? [b.first, b.second] : [b.second, b.first];
    // The voter picks "first" or "second"; the vote records which deployment that was.
    const side = choice === "first" ? b.first_side : choice === "second" ? (b.first_side === "a" ? "b" : "a") : choice;
    await post(`/api/ab-testing/${t.id}/votes`, { prompt: b.prompt, answer_a: answerA, answer_b: answerB, shown_first: b.first_side, choice: side });
    flash("vote recorded");
    await showBallot(t);
  };
  box.replaceChildren(
    h("p", { class: "prompt" }, h("strong", { text: "Prompt: " }), b.prompt),
    h("div", { class: "side-by-side" },
      h("section", {}, h("h4", { text: "First answer" }), h("pre", { id: "ballot-first", tabindex: 0, text: b.first })),
      h("section", {}, h("h4", { text: "Second answer" }), h("pre", { id: "ballot-second", tabindex: 0, text: b.second }))),
    h("div", { class: "actions" }, button("First is better", vote("first")), button("Second is better", vote("second")),
      button("Tie", vote("tie")), button("Both bad", vote("both_bad"))));
}

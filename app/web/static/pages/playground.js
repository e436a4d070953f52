// Playground: chat with one deployment, or two side by side answering the same prompt with the same
// settings (system prompt, temperature, max tokens), both streaming at once.

import { api, streamChat } from "../api.js";
import { $, onSubmit, option } from "../dom.js";

export const PAGE = "playground";
let running = null;

export function setup() {
  if (setup.done) return;
  setup.done = true;
  onSubmit($("#chat-form"), send);
}

export function leave() { running?.abort(); }

// #/playground/<model> opens it with that model chosen.
export async function show(model) {
  const deployments = await api("/api/deployments/?status=active&limit=200");
  for (const [selector, none] of [["#chat-model", null], ["#chat-model-b", "— none: one model —"]]) {
    const select = $(selector);
    const chosen = select.value;
    select.replaceChildren();
    if (none) option(select, "", none);
    for (const d of deployments.data) option(select, d.model);
    if (chosen) select.value = chosen;
  }
  if (model) $("#chat-model").value = model;
}

async function send(form) {
  running?.abort();
  running = new AbortController();
  const messages = [];
  if (form.get("system").trim()) messages.push({ role: "system", content: form.get("system") });
  messages.push({ role: "user", content: form.get("message") });
  const settings = { messages, max_tokens: Number(form.get("max_tokens")), temperature: Number(form.get("temperature")) };
  const panes = [[form.get("model"), $("#chat-output"), $("#chat-title-a")]];
  $("#chat-pane-b").hidden = !form.get("model_b");
  if (form.get("model_b")) panes.push([form.get("model_b"), $("#chat-output-b"), $("#chat-title-b")]);
  await Promise.all(panes.map(async ([model, output, title]) => {
    title.textContent = model;
    output.textContent = "";
    delete output.dataset.done;
    await streamChat({ ...settings, model }, (text) => { output.textContent += text; }, running.signal);
    output.dataset.done = "true";
  }));
}

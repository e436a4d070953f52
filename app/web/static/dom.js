// Building the page from data: every user string goes in as text (textContent / text nodes), never as
// HTML, which the page's Content-Security-Policy backs up.

export const $ = (selector, root = document) => root.querySelector(selector);

// h("a", {href: "#/x", class: "c", onclick: fn}, "text", child) -> element. `text` sets textContent.
export function h(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props ?? {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "text") node.textContent = String(value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "class") node.className = value;
    else if (key in node && typeof value !== "string") node[key] = value;
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

// A table (scrolls sideways on a phone, so it is focusable and named) of rows built by `cells(row)`.
export function table(label, headers, rows, cells) {
  const body = h("tbody");
  for (const row of rows) {
    const tr = h("tr");
    for (const value of cells(row)) tr.append(value instanceof Node && value.tagName === "TD" ? value : h("td", {}, value));
    body.append(tr);
  }
  if (!rows.length) body.append(h("tr", {}, h("td", { colspan: headers.length, class: "empty", text: "nothing yet" })));
  return h("table", { tabindex: 0, "aria-label": label },
           h("thead", {}, h("tr", {}, headers.map((name) => h("th", { text: name })))), body);
}

// A definition list's items from [term, value] pairs (values as text, or nodes).
export function facts(pairs) {
  return pairs.flatMap(([term, value]) => [h("dt", { text: term }), h("dd", {}, value)]);
}

export function button(label, onClick, props = {}) {
  return h("button", { type: "button", ...props, onclick: () => Promise.resolve(onClick()).catch(showError) }, label);
}

export function option(select, value, label) {
  select.append(h("option", { value, text: label ?? value }));
}

export const link = (href, text) => h("a", { href, text });
export const when = (iso) => (iso ? iso.slice(0, 19).replace("T", " ") : "—");
export const short = (model) => (model ?? "").split("/").slice(-2).join("/");
export const number = (x, digits = 3) => (typeof x === "number" ? Number(x.toPrecision(digits)).toLocaleString() : "—");

export function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

export function showError(error) {
  $("#error").textContent = error ? String(error.message ?? error) : "";
}

// A confirmation for the page the user is on (or is going to: set location.hash first); navigating to
// another page clears it.
let flashFor = null;
export function flash(message) {
  flashFor = location.hash;
  $("#flash").textContent = message ?? "";
}
export function clearStaleFlash() {
  if (flashFor !== location.hash) $("#flash").textContent = "";
}

// A form's 4xx: the field it names gets the message (aria-invalid, text beside it); the banner too.
export function fieldError(form, field, message) {
  for (const old of form.querySelectorAll(".field-error")) old.textContent = "";
  for (const old of form.querySelectorAll("[aria-invalid]")) old.removeAttribute("aria-invalid");
  if (!field) return false;
  const name = field.startsWith("hyperparameters.") ? field.split(".")[1] : field.split(".")[0];
  const input = form.querySelector(`[name="${CSS.escape(name)}"]`);
  if (!input) return false;
  input.setAttribute("aria-invalid", "true");
  let error = form.querySelector(`#err-${CSS.escape(name)}`);
  if (!error) {
    error = h("span", { class: "field-error", id: `err-${name}` });
    input.after(error);
  }
  error.textContent = message;
  return true;
}

// Submit handler that shows a failure at the field it names and in the banner.
export function onSubmit(form, handler) {
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      await handler(new FormData(form));
      fieldError(form, null);
      showError(null);
    } catch (error) {
      fieldError(form, error.field, error.message);
      showError(error);
    }
  });
}

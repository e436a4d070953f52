// The experiment form's hyperparameter fields, generated from the API's own schema
// (GET /api/recipes/hyperparameters, the model that validates a request), so they never drift: each knob
// is a labelled field with its help text; a field left empty keeps the recipe's value (or the default).
// A 422 that names a field is shown at that field.

function typeOf(spec) {
  const kinds = spec.anyOf ? spec.anyOf.map((s) => s.type) : [spec.type];
  if (spec.enum) return "enum";
  if (kinds.includes("boolean")) return "boolean";
  if (kinds.includes("integer") || kinds.includes("number")) return "number";
  if (kinds.includes("array")) return "list";
  return "text";
}

export function buildHyperparameterFields(container, schema) {
  container.replaceChildren();
  for (const [name, spec] of Object.entries(schema.properties)) {
    const kind = typeOf(spec);
    const field = document.createElement("div");
    field.className = "field";
    const label = document.createElement("label");
    label.htmlFor = `hp-${name}`;
    label.textContent = spec.title ?? name;
    let input;
    if (kind === "enum" || kind === "boolean") {
      input = document.createElement("select");
      const values = kind === "enum" ? spec.enum : ["true", "false"];
      for (const value of ["", ...values]) {
        const option = document.createElement("option");
        option.value = String(value);
        option.textContent = value === "" ? `default (${spec.default})` : String(value);
        input.append(option);
      }
    } else {
      input = document.createElement("input");
      input.type = kind === "number" ? "number" : "text";
      if (kind === "number") input.step = "any";
      input.placeholder = spec.default === null || spec.default === undefined ? "" : String(spec.default);
    }
    input.id = `hp-${name}`;
    input.name = name;
    input.dataset.kind = kind;
    const help = document.createElement("small");
    help.id = `help-${name}`;
    help.textContent = spec.description ?? "";
    const error = document.createElement("span");
    error.className = "field-error";
    error.id = `err-${name}`;
    input.setAttribute("aria-describedby", `help-${name} err-${name}`);
    field.append(label, input, help, error);
    container.append(field);
  }
}

export function readHyperparameters(container) {
  const values = {};
  for (const input of container.querySelectorAll("[data-kind]")) {
    const raw = input.value.trim();
    if (raw === "") continue;
    const kind = input.dataset.kind;
    if (kind === "number") values[input.name] = Number(raw);
    else if (kind === "boolean") values[input.name] = raw === "true";
    else if (kind === "list") values[input.name] = raw === "all-linear" ? raw : raw.split(",").map((s) => s.trim());
    else values[input.name] = raw;
  }
  return values;
}

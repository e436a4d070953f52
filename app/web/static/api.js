// The REST client every page uses: the login token (sessionStorage, this tab only) and the team go along
// on each request; a 4xx becomes an Error whose message names the field (and `.field` holds it).

export const state = { token: sessionStorage.getItem("studio-token"), team: null, roles: new Map(), me: null,
                       onLogout: () => {} };

export async function api(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  if (state.token) headers.Authorization = `Bearer ${state.token}`;
  if (state.team) headers["X-Team-Id"] = state.team;
  if (options.json !== undefined) headers["Content-Type"] = "application/json";
  const body = options.json !== undefined ? JSON.stringify(options.json) : options.body;
  const response = await fetch(path, { ...options, body, headers });
  if (response.status === 401) { state.onLogout(); throw new Error("session expired: log in again"); }
  const data = response.status === 204 ? null : await response.json().catch(() => null);
  if (!response.ok) throw apiError(response.status, data);
  if (options.withStatus) return { status: response.status, data };
  return data;
}

export const post = (path, json) => api(path, { method: "POST", json });

export function apiError(status, body) {
  const error = new Error(describe(status, body));
  error.field = fieldOf(body);
  error.status = status;
  return error;
}

// The request field an error names: our 4xx's `field`, or the first location of a schema error.
function fieldOf(body) {
  if (typeof body?.field === "string") return body.field;
  if (typeof body?.error?.param === "string") return body.error.param;
  const first = Array.isArray(body?.detail) ? body.detail[0] : null;
  return first ? first.loc.slice(1).join(".") : null;
}

export function describe(status, body) {
  const detail = body?.error?.message ?? body?.detail;
  if (Array.isArray(detail)) return `${status}: ${detail[0].loc.slice(1).join(".")}: ${detail[0].msg}`;
  return `${status}: ${detail ?? "request failed"}`;
}

// An upload with progress (fetch cannot report upload progress; XMLHttpRequest can).
export function upload(path, form, onProgress) {
  return new Promise((resolve, reject) => {
    const request = new XMLHttpRequest();
    request.open("POST", path);
    request.setRequestHeader("Authorization", `Bearer ${state.token}`);
    if (state.team) request.setRequestHeader("X-Team-Id", state.team);
    request.responseType = "json";
    request.upload.addEventListener("progress", (e) => { if (e.lengthComputable) onProgress(e.loaded / e.total); });
    request.addEventListener("load", () => {
      if (request.status >= 200 && request.status < 300) resolve(request.response);
      else reject(apiError(request.status, request.response));
    });
    request.addEventListener("error", () => reject(new Error("upload failed: the connection broke")));
    request.send(form);
  });
}

// Server-sent events over fetch, so the Authorization header goes along (EventSource cannot send it).
export async function* events(path, signal, init = {}) {
  const headers = { Authorization: `Bearer ${state.token}`, Accept: "text/event-stream",
                    ...(state.team ? { "X-Team-Id": state.team } : {}), ...(init.headers || {}) };
  const response = await fetch(path, { ...init, headers, signal });
  if (!response.ok) throw apiError(response.status, await response.json().catch(() => null));
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replaceAll("\r\n", "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const event = { event: "message", data: "" };
      for (const line of block.split("\n")) {
        const [field, ...rest] = line.split(":");
        const text = rest.join(":").replace(/^ /, "");
        if (field === "event") event.event = text;
        else if (field === "data") event.data += text;
        else if (field === "id") event.id = text;
      }
      if (event.data) yield event;
    }
  }
}

// A streamed OpenAI chat completion: calls onText with each piece of the answer.
export async function streamChat(body, onText, signal) {
  for await (const event of events("/v1/chat/completions", signal,
                                   { method: "POST", body: JSON.stringify({ ...body, stream: true }),
                                     headers: { "Content-Type": "application/json" } })) {
    if (event.data === "[DONE]") return;
    const chunk = JSON.parse(event.data);
    if (chunk.error) throw new Error(chunk.error.message);
    onText(chunk.choices?.[0]?.delta?.content ?? "");
  }
}

export const role = () => state.roles.get(state.team);
export const canWrite = () => role() !== "viewer";
export const isTeamAdmin = () => role() === "admin" || state.me?.is_superuser;

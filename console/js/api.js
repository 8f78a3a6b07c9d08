// The public HTTP API, as any client calls it: the API key from this tab's session storage
// as a bearer token, errors in OpenAI's shape turned into ApiError (message, code, request id).

import { h } from "./dom.js";

const KEY = "ragmesh.apiKey";

export const apiKey = {
  get: () => sessionStorage.getItem(KEY) || "",
  set: (value) => (value ? sessionStorage.setItem(KEY, value) : sessionStorage.removeItem(KEY)),
};

export class ApiError extends Error {
  constructor(message, { status = 0, code = null, type = null, requestId = null } = {}) {
    super(message);
    this.status = status;
    this.code = code;
    this.type = type;
    this.requestId = requestId;
  }
}

/** fetch with the bearer key; `bearer` overrides it (the admin key on the keys page). */
export async function request(path, { method = "GET", json, body, headers = {}, signal, bearer } = {}) {
  const sent = { Accept: "application/json", ...headers };
  const key = bearer ?? apiKey.get();
  if (key) sent.Authorization = `Bearer ${key}`;
  if (json !== undefined) {
    sent["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  }
  let response;
  try {
    response = await fetch(path, { method, headers: sent, body, signal, cache: "no-store" });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(`The gateway could not be reached (${err.message}).`);
  }
  if (!response.ok) throw await errorOf(response);
  return response;
}

/** request() and the body as JSON. */
export async function getJson(path, options) {
  const response = await request(path, options);
  return response.json();
}

/** An ApiError from a failed response (its OpenAI-shaped body, or its status line). */
export async function errorOf(response) {
  const requestId = response.headers.get("x-request-id");
  let error = null;
  try {
    error = (await response.json()).error;
  } catch {
    // not JSON: nginx's own page, or nothing
  }
  const message = error?.message || `${response.status} ${response.statusText}`.trim();
  return new ApiError(message, {
    status: response.status,
    code: error?.code ?? null,
    type: error?.type ?? null,
    requestId: error?.request_id || requestId,
  });
}

/** An error as the page shows it: the message, its code and status, and the request id. */
export function errorView(err) {
  if (!(err instanceof ApiError)) return h("div", { class: "error", role: "alert" }, String(err?.message || err));
  const details = [err.status ? `HTTP ${err.status}` : null, err.code].filter(Boolean).join(" · ");
  return h(
    "div",
    { class: "error", role: "alert" },
    h("strong", {}, err.message),
    details ? h("span", { class: "error-code" }, ` (${details})`) : null,
    err.requestId ? h("span", { class: "request-id" }, "request id: ", h("code", {}, err.requestId)) : null,
    err.status === 401 ? h("span", { class: "hint" }, "Paste an API key at the top of the page.") : null,
  );
}

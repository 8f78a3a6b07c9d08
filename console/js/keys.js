// API keys: create (the secret is shown once), list, revoke. Only where the admin API is
// reachable on this origin (the gateway's internal admin server); the public gateway
// answers 404 there and the page is never offered. The admin key stays in this tab's
// session storage, like the API key.

import { errorView, getJson, request } from "./api.js";
import { $, fill, h, when } from "./dom.js";

const KEY = "ragmesh.adminKey";
const adminKey = () => sessionStorage.getItem(KEY) || "";

/** True when /v1/admin answers on this origin (401 without the key, or 200). */
export async function adminReachable() {
  try {
    const response = await fetch("/v1/admin/keys", { headers: { Accept: "application/json" }, cache: "no-store" });
    if (response.status !== 404) return true;
    // The admin listener with the admin API off also says 404, but not the gateway's "unknown_url".
    const body = await response.json().catch(() => null);
    return Boolean(body?.error) && body.error.code !== "unknown_url";
  } catch {
    return false;
  }
}

export function initKeys() {
  $("#admin-key").value = adminKey();
  $("#admin-key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = $("#admin-key").value.trim();
    if (value) sessionStorage.setItem(KEY, value);
    else sessionStorage.removeItem(KEY);
    showKeys();
  });
  $("#key-create").addEventListener("submit", create);
}

export async function showKeys() {
  const out = $("#keys-out");
  fill(out);
  let keys;
  try {
    keys = (await getJson("/v1/admin/keys", { bearer: adminKey() })).data;
  } catch (err) {
    fill($("#keys-table tbody"));
    fill(out, errorView(err));
    return;
  }
  fill(
    $("#keys-table tbody"),
    keys.map((k) =>
      h(
        "tr",
        { dataset: { id: k.id } },
        h("td", {}, h("code", {}, k.id)),
        h("th", { scope: "row" }, k.name),
        h("td", {}, limits(k)),
        h("td", {}, k.expires_at ? when(k.expires_at) : "never"),
        h("td", {}, k.revoked ? "revoked" : "active"),
        h("td", {}, k.revoked ? "" : h("button", { type: "button", class: "danger", "aria-label": `Revoke key ${k.name}`, onclick: () => revoke(k.id) }, "Revoke")),
      ),
    ),
  );
}

function limits(k) {
  return [k.rpm ? `${k.rpm} req/min` : null, k.tpm ? `${k.tpm} tokens/min` : null, k.models ? `models: ${k.models.join(", ")}` : null].filter(Boolean).join(" · ") || "none";
}

async function create(event) {
  event.preventDefault();
  const body = { name: $("#key-name").value.trim() };
  const rpm = parseInt($("#key-rpm").value, 10);
  const tpm = parseInt($("#key-tpm").value, 10);
  const days = parseFloat($("#key-expires").value);
  const models = $("#key-models").value.split(",").map((m) => m.trim()).filter(Boolean);
  if (rpm > 0) body.rpm = rpm;
  if (tpm > 0) body.tpm = tpm;
  if (days > 0) body.expires_in = Math.round(days * 86400);
  if (models.length) body.models = models;
  const out = $("#key-created");
  try {
    const created = await getJson("/v1/admin/keys", { method: "POST", json: body, bearer: adminKey() });
    fill(out, h("p", { class: "ok" }, `Key “${created.name}” created. Its secret is shown this once: `, h("code", { class: "secret" }, created.key)));
    $("#key-create").reset();
  } catch (err) {
    fill(out, errorView(err));
  }
  showKeys();
}

async function revoke(id) {
  try {
    await request(`/v1/admin/keys/${encodeURIComponent(id)}`, { method: "DELETE", bearer: adminKey() });
  } catch (err) {
    fill($("#keys-out"), errorView(err));
    return;
  }
  showKeys();
}

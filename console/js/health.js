// Readiness at a glance: /v1/health/ready names each dependency of the mesh (inference,
// retrieval, postprocess, Redis, RabbitMQ, batch workers) and whether it answers.

import { $, fill, h } from "./dom.js";

const POLL_MS = 10000;

export async function watchHealth() {
  let items;
  try {
    const response = await fetch("/v1/health/ready", { headers: { Accept: "application/json" }, cache: "no-store" });
    const body = await response.json().catch(() => ({}));
    const deps = body.dependencies || {};
    items = [item("gateway", "ok"), ...Object.entries(deps).map(([name, state]) => item(name, state))];
    if (!Object.keys(deps).length) items.push(item("mesh", body.status || `HTTP ${response.status}`));
  } catch (err) {
    items = [item("gateway", `unreachable: ${err.message}`)];
  }
  fill($("#health"), items);
  setTimeout(watchHealth, POLL_MS);
}

function item(name, state) {
  const ok = state === "ok";
  return h(
    "li",
    { class: ok ? "up" : "down", dataset: { service: name }, title: ok ? `${name}: ready` : `${name}: ${state}` },
    h("span", { class: "dot", "aria-hidden": "true" }),
    `${name}: `,
    h("span", { class: "state" }, ok ? "ready" : state),
  );
}

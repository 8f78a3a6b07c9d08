// The console's entry point: pages by URL fragment (#chat, #collections, #batches, #keys),
// the API key field, readiness, and the keys page where the admin API is reachable.

import { apiKey } from "./api.js";
import { initBatches, showBatches } from "./batches.js";
import { loadCollections, loadModels } from "./catalog.js";
import { initChat } from "./chat.js";
import { initCollections } from "./collections.js";
import { $ } from "./dom.js";
import { watchHealth } from "./health.js";
import { adminReachable, initKeys, showKeys } from "./keys.js";

const PAGES = ["chat", "collections", "batches", "keys"];
let admin = false;

function show() {
  let page = location.hash.slice(1);
  if (!PAGES.includes(page) || (page === "keys" && !admin)) page = "chat";
  for (const name of PAGES) $(`#page-${name}`).hidden = name !== page;
  for (const link of document.querySelectorAll("nav a")) {
    if (link.dataset.page === page) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  document.title = `${page[0].toUpperCase()}${page.slice(1)} · ragmesh console`;
  if (page === "batches") showBatches();
  if (page === "keys") showKeys();
  if (page === "collections") loadCollections();
}

function keyState() {
  $("#api-key-state").textContent = apiKey.get() ? "key set for this tab" : "no key";
}

function initApiKey() {
  $("#api-key").value = apiKey.get();
  keyState();
  $("#apikey-form").addEventListener("submit", (event) => {
    event.preventDefault();
    apiKey.set($("#api-key").value.trim());
    keyState();
    reload();
  });
  $("#api-key-forget").addEventListener("click", () => {
    apiKey.set("");
    $("#api-key").value = "";
    keyState();
    reload();
  });
}

function reload() {
  loadModels();
  loadCollections();
  if (!$("#page-batches").hidden) showBatches();
}

async function main() {
  initApiKey();
  initChat();
  initCollections();
  initBatches();
  initKeys();
  watchHealth();
  window.addEventListener("hashchange", () => {
    show();
    $("#main").focus({ preventScroll: true });
  });
  show();
  reload();
  admin = await adminReachable();
  $("#nav-keys").hidden = !admin;
  $("#origin-note").textContent = admin ? "admin" : "";
  if (admin && location.hash === "#keys") show();
  document.body.dataset.ready = "1"; // the tests wait for this
}

main();

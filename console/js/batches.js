// Batches: upload a JSONL file and run it, watch the request counts move, download the
// results and the errors, cancel.

import { errorView, getJson, request } from "./api.js";
import { $, fill, h, when } from "./dom.js";

const DONE = new Set(["completed", "failed", "cancelled", "expired"]);
const POLL_MS = 1000;
let timer = null;

export function initBatches() {
  $("#batch-form").addEventListener("submit", submit);
  $("#batches-refresh").addEventListener("click", refresh);
}

/** Called when the page is shown: list the key's batches, and keep watching running ones. */
export function showBatches() {
  refresh();
}

async function submit(event) {
  event.preventDefault();
  const out = $("#batch-form-out");
  const file = $("#batch-file").files[0];
  if (!file) return;
  const form = new FormData();
  form.append("purpose", "batch");
  form.append("file", file, file.name);
  try {
    fill(out, h("p", {}, `Uploading ${file.name}…`));
    const uploaded = await getJson("/v1/files", { method: "POST", body: form });
    const batch = await getJson("/v1/batches", {
      method: "POST",
      json: { input_file_id: uploaded.id, endpoint: $("#batch-endpoint").value, completion_window: $("#batch-window").value.trim() || "24h" },
    });
    fill(out, h("p", { class: "ok" }, "Batch ", h("code", {}, batch.id), ` started from ${file.name}.`));
    $("#batch-file").value = "";
    refresh();
  } catch (err) {
    fill(out, errorView(err));
  }
}

async function refresh() {
  clearTimeout(timer);
  const list = $("#batches");
  let batches;
  try {
    batches = (await getJson("/v1/batches?limit=20")).data;
  } catch (err) {
    fill(list, h("li", {}, errorView(err)));
    return;
  }
  fill(list, batches.length ? batches.map(batchItem) : h("li", { class: "hint" }, "No batches yet."));
  const visible = !$("#page-batches").hidden;
  if (visible && batches.some((b) => !DONE.has(b.status))) timer = setTimeout(refresh, POLL_MS);
}

function batchItem(b) {
  const counts = b.request_counts || { total: 0, completed: 0, failed: 0 };
  const item = h(
    "li",
    { class: "batch", dataset: { id: b.id, status: b.status } },
    h("div", { class: "batch-head" }, h("code", {}, b.id), " ", h("span", { class: `badge ${b.status}` }, b.status), " ", h("span", { class: "hint" }, `${b.endpoint} · ${when(b.created_at)}`)),
    h("progress", { max: Math.max(counts.total, 1), value: counts.completed + counts.failed, "aria-label": `Batch ${b.id} progress` }),
    h("span", { class: "counts" }, `${counts.completed} completed, ${counts.failed} failed of ${counts.total}`),
  );
  const actions = h("div", { class: "buttons" });
  if (!DONE.has(b.status) && b.status !== "cancelling") {
    actions.append(h("button", { type: "button", class: "danger", onclick: () => cancel(b.id, item) }, "Cancel"));
  }
  if (b.output_file_id) actions.append(h("button", { type: "button", onclick: () => download(b.output_file_id, `${b.id}-results.jsonl`, item) }, "Download results"));
  if (b.error_file_id) actions.append(h("button", { type: "button", onclick: () => download(b.error_file_id, `${b.id}-errors.jsonl`, item) }, "Download errors"));
  item.append(actions);
  return item;
}

async function cancel(id, item) {
  try {
    await getJson(`/v1/batches/${encodeURIComponent(id)}/cancel`, { method: "POST" });
  } catch (err) {
    item.append(errorView(err));
    return;
  }
  refresh();
}

/** A file's contents through the API (with the key), saved by the browser. */
async function download(fileId, name, item) {
  try {
    const response = await request(`/v1/files/${encodeURIComponent(fileId)}/content`);
    const url = URL.createObjectURL(await response.blob());
    const link = h("a", { href: url, download: name, hidden: true });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  } catch (err) {
    item.append(errorView(err));
  }
}

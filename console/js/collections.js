// Collections: create, delete, upload files (drag and drop) and watch each ingestion job
// to its end, search with ranked passages, scores and mode.

import { errorView, getJson } from "./api.js";
import { catalog, fillSelect, loadCollections, onCatalog } from "./catalog.js";
import { $, fill, h, score } from "./dom.js";
import { documentsOf } from "./documents.js";

// Documents per POST: well under the server's limit (RAGMESH_PREPROCESS_MAX_DOCUMENTS_PER_REQUEST).
const PER_REQUEST = 50;
const POLL_MS = 500;

export function initCollections() {
  onCatalog(render);
  $("#collections-refresh").addEventListener("click", loadCollections);
  $("#collection-create").addEventListener("submit", create);
  $("#search-form").addEventListener("submit", search);
  $("#upload-files").addEventListener("change", (event) => {
    upload([...event.target.files]);
    event.target.value = "";
  });
  const zone = $("#dropzone");
  zone.addEventListener("click", () => $("#upload-files").click());
  zone.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      $("#upload-files").click();
    }
  });
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    upload([...(event.dataTransfer?.files || [])]);
  });
}

function render() {
  const names = catalog.collections.map((c) => [c.name, c.name]);
  fillSelect($("#upload-collection"), names);
  fillSelect($("#search-collection"), names);
  fill(
    $("#collections-table tbody"),
    catalog.collections.map((c) =>
      h(
        "tr",
        { dataset: { name: c.name } },
        h("th", { scope: "row" }, c.name),
        h("td", {}, String(c.documents)),
        h("td", {}, String(c.chunks)),
        h("td", {}, `${c.index_type} v${c.index_version}`),
        h("td", {}, deleteButton(c.name)),
      ),
    ),
  );
}

/** Delete asks once more on the same button (no window.confirm). */
function deleteButton(name) {
  const button = h("button", { type: "button", class: "danger", "aria-label": `Delete collection ${name}` }, "Delete");
  button.addEventListener("click", async () => {
    if (!button.dataset.armed) {
      button.dataset.armed = "1";
      button.textContent = "Confirm delete";
      return;
    }
    try {
      await getJson(`/v1/collections/${encodeURIComponent(name)}`, { method: "DELETE" });
    } catch (err) {
      fill($("#collection-create-out"), errorView(err));
    }
    loadCollections();
  });
  return button;
}

async function create(event) {
  event.preventDefault();
  const name = $("#collection-name").value.trim();
  const out = $("#collection-create-out");
  try {
    await getJson("/v1/collections", { method: "POST", json: { name } });
    fill(out, h("p", { class: "ok" }, `Collection “${name}” created.`));
    $("#collection-name").value = "";
    await loadCollections();
    $("#upload-collection").value = name;
    $("#search-collection").value = name;
  } catch (err) {
    fill(out, errorView(err));
  }
}

async function upload(files) {
  const collection = $("#upload-collection").value;
  for (const file of files) {
    const row = h("li", { class: "job", dataset: { file: file.name } }, h("strong", {}, file.name), " ");
    $("#jobs").prepend(row);
    if (!collection) {
      row.append(errorView(new Error("Create or choose a collection first.")));
      continue;
    }
    let docs;
    try {
      docs = await documentsOf(file);
    } catch (err) {
      row.append(errorView(err));
      continue;
    }
    for (let start = 0; start < docs.length; start += PER_REQUEST) {
      const part = docs.slice(start, start + PER_REQUEST);
      try {
        const job = await getJson(`/v1/collections/${encodeURIComponent(collection)}/documents`, { method: "POST", json: { documents: part } });
        watchJob(row, job, part.length);
      } catch (err) {
        row.append(errorView(err));
        break;
      }
    }
  }
}

/** A progress bar for the job, polled until it succeeds or fails. */
async function watchJob(row, job, count) {
  const bar = h("progress", { max: 1, value: 0, "aria-label": `Job ${job.job_id}` });
  const state = h("span", { class: "job-status", dataset: { job: job.job_id } }, job.status || "queued");
  row.append(h("div", { class: "job-line" }, `${count} document${count === 1 ? "" : "s"} → `, h("code", {}, job.job_id), " ", bar, " ", state));
  for (;;) {
    let current;
    try {
      current = await getJson(`/v1/jobs/${encodeURIComponent(job.job_id)}`);
    } catch (err) {
      row.append(errorView(err));
      return;
    }
    bar.max = Math.max(current.total, 1);
    bar.value = current.status === "succeeded" ? bar.max : current.done;
    state.textContent = `${current.status} (${current.done}/${current.total} chunks)`;
    state.dataset.status = current.status;
    if (current.status === "succeeded" || current.status === "failed") {
      if (current.error) row.append(errorView(new Error(current.error)));
      loadCollections();
      return;
    }
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
  }
}

async function search(event) {
  event.preventDefault();
  const body = {
    collection: $("#search-collection").value,
    query: $("#search-query").value,
    top_k: parseInt($("#search-topk").value, 10) || 5,
    mode: $("#search-mode").value,
  };
  const list = $("#search-results");
  const summary = $("#search-summary");
  fill(list);
  try {
    const found = await getJson("/v1/search", { method: "POST", json: body });
    const reranked = found.rerank === "ok" ? `, reranked by ${found.rerank_model}` : "";
    summary.textContent = `${found.results.length} passages from “${found.collection}”, mode ${found.mode}${reranked}, index v${found.index_version}${found.cached ? " (cached)" : ""}.`;
    fill(
      list,
      found.results.map((r, i) =>
        h(
          "li",
          { class: "result" },
          h(
            "div",
            { class: "result-head" },
            h("span", { class: "rank" }, `#${i + 1}`),
            " ",
            h("strong", {}, r.title || r.document_id),
            " ",
            h("span", { class: "score" }, `score ${score(r.score)}`),
            r.rerank_score != null ? h("span", { class: "score" }, ` rerank ${score(r.rerank_score)}`) : null,
          ),
          h("div", { class: "hint" }, "document ", h("code", {}, r.document_id), " · chunk ", h("code", {}, r.chunk_id)),
          h("p", { class: "passage-text" }, r.text),
        ),
      ),
    );
  } catch (err) {
    summary.textContent = "";
    list.append(h("li", {}, errorView(err)));
  }
}

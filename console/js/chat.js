// Chat: streamed answers (fetch + SSE), a stop button that aborts the request (the mesh
// cancels the generation when the client goes away, and the engine frees its slot),
// settings, RAG with numbered citations that open their passages.

import { ApiError, errorView, request } from "./api.js";
import { catalog, chatModels, fillSelect, onCatalog } from "./catalog.js";
import { $, fill, h, score } from "./dom.js";
import { events } from "./sse.js";

const conversation = []; // {role, content} sent with each request
let inFlight = null; // the AbortController of the answer being streamed

export function initChat() {
  onCatalog(renderPickers);
  $("#chat-model").addEventListener("change", aliasNote);
  $("#chat-form").addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  $("#chat-input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });
  $("#chat-stop").addEventListener("click", () => inFlight?.abort());
  $("#chat-clear").addEventListener("click", () => {
    inFlight?.abort();
    conversation.length = 0;
    fill($("#messages"));
    $("#chat-input").focus();
  });
  $("#passage").addEventListener("click", (event) => {
    if (event.target === $("#passage")) $("#passage").close(); // a click on the backdrop
  });
}

function renderPickers() {
  const models = chatModels().map((m) => [m.id, m.rag ? `${m.id} (RAG: ${m.rag.collection})` : m.id]);
  fillSelect($("#chat-model"), models);
  fillSelect(
    $("#chat-collection"),
    catalog.collections.map((c) => [c.name, c.name]),
    { empty: "None (no RAG)" },
  );
  aliasNote();
  fill($("#chat-catalog-error"), catalog.error ? errorView(catalog.error) : null);
}

function selectedModel() {
  return catalog.models.find((m) => m.id === $("#chat-model").value);
}

/** A RAG alias binds its collection: the picker gives way to it. */
function aliasNote() {
  const bound = selectedModel()?.rag;
  $("#chat-collection").disabled = Boolean(bound);
  $("#chat-alias-note").textContent = bound ? `This alias answers from collection “${bound.collection}”.` : "";
}

function settings() {
  const body = { model: $("#chat-model").value, stream: true, stream_options: { include_usage: true } };
  const temperature = parseFloat($("#chat-temperature").value);
  if (!Number.isNaN(temperature)) body.temperature = temperature;
  const maxTokens = parseInt($("#chat-max-tokens").value, 10);
  if (maxTokens > 0) body.max_tokens = maxTokens;
  const collection = $("#chat-collection").value;
  if (collection && !selectedModel()?.rag) {
    body.rag = { collection, mode: $("#chat-mode").value };
    const topK = parseInt($("#chat-topk").value, 10);
    if (topK > 0) body.rag.top_k = topK;
  }
  return body;
}

function messageItem(role) {
  const content = h("div", { class: "content" });
  const item = h("li", { class: `msg ${role}`, dataset: { role } }, h("div", { class: "role" }, role === "user" ? "You" : "Assistant"), content);
  $("#messages").append(item);
  return { item, content };
}

async function send() {
  const input = $("#chat-input");
  const text = input.value.trim();
  if (!text || inFlight) return;
  if (!$("#chat-model").value) {
    $("#messages").append(h("li", { class: "msg notice" }, errorView(new ApiError("No model to chat with: check the API key and the readiness above."))));
    return;
  }
  input.value = "";
  messageItem("user").content.textContent = text;
  conversation.push({ role: "user", content: text });

  const body = settings();
  const system = $("#chat-system").value.trim();
  body.messages = [...(system ? [{ role: "system", content: system }] : []), ...conversation];

  const answer = messageItem("assistant");
  answer.item.setAttribute("aria-busy", "true");
  const textNode = document.createTextNode("");
  answer.content.append(textNode);
  const controller = new AbortController();
  inFlight = controller;
  streaming(true);
  let citations = null;
  let rag = null;
  let usage = null;
  let finish = null;
  try {
    const response = await request("/v1/chat/completions", { method: "POST", json: body, signal: controller.signal });
    for await (const chunk of events(response)) {
      if (chunk.error) throw new ApiError(chunk.error.message, { code: chunk.error.code, type: chunk.error.type, requestId: chunk.error.request_id || response.headers.get("x-request-id") });
      const choice = chunk.choices?.[0];
      if (choice?.delta?.content) textNode.appendData(choice.delta.content);
      if (choice?.finish_reason) finish = choice.finish_reason;
      if (chunk.citations) citations = chunk.citations;
      if (chunk.rag) rag = chunk.rag;
      if (chunk.usage) usage = chunk.usage;
    }
    conversation.push({ role: "assistant", content: textNode.data });
  } catch (err) {
    if (err.name === "AbortError") {
      answer.item.classList.add("stopped");
      answer.item.append(h("p", { class: "hint" }, "Stopped."));
      if (textNode.data) conversation.push({ role: "assistant", content: textNode.data });
    } else {
      answer.item.append(errorView(err));
      conversation.pop(); // the question stays on the page; it is not sent again without an answer
    }
  } finally {
    inFlight = null;
    streaming(false);
    answer.item.removeAttribute("aria-busy");
  }
  if (rag) answer.item.append(ragStatus(rag));
  if (citations?.length) answer.item.append(citationList(citations));
  if (usage || finish) {
    const parts = [finish ? `finish: ${finish}` : null, usage ? `${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion tokens` : null];
    answer.item.append(h("p", { class: "hint usage" }, parts.filter(Boolean).join(" · ")));
  }
}

function streaming(on) {
  $("#chat-send").disabled = on;
  $("#chat-stop").disabled = !on;
  if (on) $("#chat-stop").focus();
  else if (document.activeElement === $("#chat-stop") || document.activeElement === document.body) $("#chat-input").focus();
}

/** rag.status other than "ok" said plainly (no sources, retrieval down and answered without). */
function ragStatus(rag) {
  const plain = {
    ok: `Answered from collection “${rag.collection}”: ${rag.passages_used} of ${rag.passages_retrieved} passages used.`,
    no_sources: `No sources were found in collection “${rag.collection}”.`,
    no_context: `Retrieval failed, so this answer has no sources${rag.error ? `: ${rag.error}` : "."}`,
  };
  const text = plain[rag.status] || `RAG status: ${rag.status}${rag.error ? ` (${rag.error})` : ""}`;
  return h("p", { class: `rag-status ${rag.status === "ok" ? "ok" : "problem"}`, role: rag.status === "ok" ? null : "alert", dataset: { status: rag.status } }, text);
}

function citationList(citations) {
  return h(
    "div",
    { class: "citations" },
    h("h4", {}, "Sources"),
    h(
      "ol",
      {},
      citations.map((c) =>
        h(
          "li",
          {},
          h(
            "button",
            { type: "button", class: `citation${c.cited ? " cited" : ""}`, dataset: { index: c.index }, onclick: () => openPassage(c) },
            `[${c.index}] `,
            c.title || c.document_id,
          ),
          c.cited ? h("span", { class: "hint" }, " cited") : null,
        ),
      ),
    ),
  );
}

function openPassage(c) {
  $("#passage-title").textContent = `[${c.index}] ${c.title || c.document_id}`;
  $("#passage-doc").textContent = c.document_id;
  $("#passage-chunk").textContent = c.chunk_id;
  $("#passage-score").textContent = c.rerank_score != null ? `${score(c.score)} (rerank ${score(c.rerank_score)})` : score(c.score);
  $("#passage-text").textContent = c.snippet;
  $("#passage").showModal();
  $("#passage-close").focus();
}

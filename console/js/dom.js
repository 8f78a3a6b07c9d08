// Building the page from data. Everything a model, a document or the API returns is put
// in as text (textContent / text nodes), never parsed as HTML: an answer or a passage
// that contains markup is shown as the characters it is, and cannot run script here.

/**
 * h("li", {class: "msg", dataset: {role: "user"}}, "text", child) -> an element.
 * Attributes are set one by one (no innerHTML); strings become text nodes.
 */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") el.className = value;
    else if (name === "dataset") Object.assign(el.dataset, value);
    else if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else if (value === true) el.setAttribute(name, "");
    else el.setAttribute(name, String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

/** Replace an element's children. */
export function fill(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

export const $ = (selector) => document.querySelector(selector);

/** A number as a short score: 0.8734 -> "0.873". */
export function score(value) {
  return typeof value === "number" ? value.toFixed(3) : "";
}

/** Seconds since the epoch as a local date and time. */
export function when(seconds) {
  return seconds ? new Date(seconds * 1000).toLocaleString() : "";
}

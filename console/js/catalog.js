// The models and collections the key can see, loaded once and refreshed on demand; the
// pages that offer them in pickers listen for changes.

import { getJson } from "./api.js";

const listeners = new Set();
export const catalog = { models: [], collections: [], error: null };

export function onCatalog(listener) {
  listeners.add(listener);
}

function changed() {
  for (const listener of listeners) listener(catalog);
}

export async function loadModels() {
  try {
    catalog.models = (await getJson("/v1/models")).data;
    catalog.error = null;
  } catch (err) {
    catalog.models = [];
    catalog.error = err;
  }
  changed();
}

export async function loadCollections() {
  try {
    catalog.collections = (await getJson("/v1/collections")).data;
  } catch (err) {
    catalog.collections = [];
    catalog.error = err;
  }
  changed();
}

/** Models that chat: listed as "chat" (or listing nothing), never embedding or rerank models. */
export function chatModels() {
  return catalog.models.filter((m) => {
    const caps = m.capabilities || [];
    return caps.length === 0 || caps.includes("chat");
  });
}

/** Fill a <select> with options, keeping its value when it is still offered. */
export function fillSelect(select, options, { empty } = {}) {
  const previous = select.value;
  select.replaceChildren();
  if (empty) select.append(new Option(empty, ""));
  for (const [value, label] of options) select.append(new Option(label, value));
  if ([...select.options].some((o) => o.value === previous)) select.value = previous;
}

// Files to documents, as the `ragmesh ingest` command reads them: a .txt or .md file is one
// document (its file name is its id and title); a .jsonl file has one document a line,
// {"id" or "_id", "text", "title"?, "metadata"?}.

/** The documents of one File; throws an Error naming the file and line of a bad one. */
export async function documentsOf(file) {
  const text = await file.text();
  const name = file.name;
  if (/\.(txt|md)$/i.test(name)) {
    if (!text.trim()) throw new Error(`${name} is empty.`);
    return [{ id: name, title: name.replace(/\.(txt|md)$/i, ""), text, metadata: { source: name } }];
  }
  if (/\.jsonl$/i.test(name)) {
    const docs = [];
    text.split(/\r?\n/).forEach((line, i) => {
      if (!line.trim()) return;
      let row;
      try {
        row = JSON.parse(line);
      } catch {
        throw new Error(`${name} line ${i + 1} is not JSON.`);
      }
      const id = row.id ?? row._id;
      if (id === undefined || typeof row.text !== "string") throw new Error(`${name} line ${i + 1} needs "id" (or "_id") and "text".`);
      const doc = { id: String(id), text: row.text };
      if (row.title) doc.title = String(row.title);
      if (row.metadata && typeof row.metadata === "object") doc.metadata = row.metadata;
      docs.push(doc);
    });
    if (!docs.length) throw new Error(`${name} has no documents.`);
    return docs;
  }
  throw new Error(`${name}: only .txt, .md and .jsonl files can be uploaded.`);
}

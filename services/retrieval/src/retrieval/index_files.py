"""A collection's files: one generation folder, appended to, never rewritten.

```
<collection>/CURRENT                 names the live generation (replaced by rename)
<collection>/g<version>-<id>/chunks.jsonl    one chunk a line, appended
                             vectors.f32     float32 rows, little-endian, appended
                             manifest.json   state, rows and bytes that count (replaced by rename)
                             hnsw-<rows>.faiss  the HNSW graph over the first rows, when built
```

A job appends its rows to both data files, fsyncs them, then replaces the
manifest: only rows the manifest counts exist, so a crash mid-append leaves
the previous state (the next append cuts the files back to the manifest's
size first). A change that removes rows, or a snapshot with no generation on
disk, writes a new generation in a temporary folder, renames it and then
CURRENT, so a crash leaves either the old or the new state, never a mix.
Folders of the layout before generations (`v<version>/` with `meta.json`) still load.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import orjson

from ragmesh.durable import fsync_dir, write_atomic
from retrieval.chunk_log import ChunkRecord
from retrieval.index import HnswBase, IndexParams, Meta, SavedState, Snapshot

CHUNKS = "chunks.jsonl"
VECTORS = "vectors.f32"
MANIFEST = "manifest.json"


def save(snapshot: Snapshot, collection_dir: Path) -> Snapshot:
    """Append what is new since the snapshot's saved state, or write a generation whole (blocking)."""
    saved = snapshot.saved
    if saved is not None and saved.rows <= snapshot.n and _current(collection_dir) == saved.generation:
        return _append(snapshot, collection_dir / saved.generation, saved)
    return _write_generation(snapshot, collection_dir)


def save_hnsw(snapshot: Snapshot, base: HnswBase, collection_dir: Path) -> bool:
    """Write a graph into the snapshot's generation folder (not yet counted: see `save`); whether
    the folder is still the live one."""
    saved = snapshot.saved
    if saved is None or _current(collection_dir) != saved.generation:
        return False
    folder = collection_dir / saved.generation
    tmp = folder / f".hnsw-{base.rows}.tmp-{os.getpid()}"
    faiss.write_index(base.index, str(tmp))
    with open(tmp, "rb") as written:
        os.fsync(written.fileno())
    os.replace(tmp, folder / f"hnsw-{base.rows}.faiss")
    fsync_dir(folder)
    return True


def _current(collection_dir: Path) -> str | None:
    try:
        return (collection_dir / "CURRENT").read_text().strip()
    except FileNotFoundError:
        return None


def _encode(chunks: object) -> bytes:
    return b"".join(orjson.dumps(c.to_json()) + b"\n" for c in chunks)  # type: ignore[attr-defined]


def _append_bytes(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as out:
        out.seek(offset)
        out.truncate()  # what a crash left past the manifest's count
        out.write(data)
        out.flush()
        os.fsync(out.fileno())


def _manifest(snapshot: Snapshot, rows: int, chunk_bytes: int, hnsw_rows: int) -> bytes:
    return orjson.dumps(
        {"meta": snapshot.meta.to_json(), "rows": rows, "chunk_bytes": chunk_bytes, "hnsw_rows": hnsw_rows}
    )


def _append(snapshot: Snapshot, folder: Path, saved: SavedState) -> Snapshot:
    new_chunks = snapshot.chunks[saved.rows : snapshot.n]
    data = _encode(new_chunks)
    if data:
        _append_bytes(folder / CHUNKS, saved.chunk_bytes, data)
        vectors = np.ascontiguousarray(snapshot.vectors[saved.rows :], dtype="<f4")
        _append_bytes(folder / VECTORS, saved.rows * vectors.shape[1] * 4, vectors.tobytes())
    hnsw_rows = saved.hnsw_rows if (folder / f"hnsw-{saved.hnsw_rows}.faiss").exists() else 0
    state = SavedState(saved.generation, snapshot.n, saved.chunk_bytes + len(data), hnsw_rows)
    write_atomic(folder / MANIFEST, _manifest(snapshot, state.rows, state.chunk_bytes, hnsw_rows))
    return replace(snapshot, saved=state)


def _write_generation(snapshot: Snapshot, collection_dir: Path) -> Snapshot:
    collection_dir.mkdir(parents=True, exist_ok=True)
    generation = f"g{snapshot.meta.version}-{uuid.uuid4().hex[:8]}"
    tmp = collection_dir / f".tmp-{generation}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    data = _encode(snapshot.chunks)
    for name, content in ((CHUNKS, data), (VECTORS, np.ascontiguousarray(snapshot.vectors, dtype="<f4").tobytes())):
        with open(tmp / name, "wb") as out:
            out.write(content)
            out.flush()
            os.fsync(out.fileno())
    hnsw_rows = 0
    if snapshot.hnsw is not None:
        faiss.write_index(snapshot.hnsw.index, str(tmp / f"hnsw-{snapshot.hnsw.rows}.faiss"))
        hnsw_rows = snapshot.hnsw.rows
    write_atomic(tmp / MANIFEST, _manifest(snapshot, snapshot.n, len(data), hnsw_rows))
    fsync_dir(tmp)
    os.replace(tmp, collection_dir / generation)
    write_atomic(collection_dir / "CURRENT", generation.encode())
    for old in collection_dir.iterdir():
        if old.name not in (generation, "CURRENT") and old.name[:1] in ("g", "v", "."):
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    return replace(snapshot, saved=SavedState(generation, snapshot.n, len(data), hnsw_rows))


def load(collection_dir: Path, params: IndexParams) -> Snapshot | None:
    """The snapshot CURRENT names, or None when there is none (never finished writing)."""
    current = _current(collection_dir)
    if current is None:
        return None
    folder = collection_dir / current
    if not (folder / MANIFEST).exists():
        return _load_legacy(folder)
    manifest = orjson.loads((folder / MANIFEST).read_bytes())
    meta = Meta.from_json(manifest["meta"])
    rows, chunk_bytes = int(manifest["rows"]), int(manifest["chunk_bytes"])
    with open(folder / CHUNKS, "rb") as source:
        data = source.read(chunk_bytes)
    chunks = [ChunkRecord.from_json(orjson.loads(line)) for line in data.splitlines()]
    if len(chunks) != rows:
        raise ValueError(f"{folder}: the manifest counts {rows} chunks, the file holds {len(chunks)}")
    dims = meta.dimensions
    vectors = np.fromfile(folder / VECTORS, dtype="<f4", count=rows * dims).reshape(rows, dims) if rows else None
    snapshot = Snapshot.build(meta, chunks, vectors if vectors is not None else np.zeros((0, dims), np.float32))
    hnsw_rows = int(manifest.get("hnsw_rows", 0))
    graph = folder / f"hnsw-{hnsw_rows}.faiss"
    if hnsw_rows and graph.exists():
        index: Any = faiss.read_index(str(graph))
        index.hnsw.efSearch = params.hnsw_ef_search
        snapshot = replace(snapshot, hnsw=HnswBase(index, hnsw_rows))
    else:
        hnsw_rows = 0
    return replace(snapshot, saved=SavedState(current, rows, chunk_bytes, hnsw_rows))


def _load_legacy(folder: Path) -> Snapshot:
    """A `v<version>/` folder of the layout before generations (written whole at the next change)."""
    meta = Meta.from_json(json.loads((folder / "meta.json").read_text()))
    with open(folder / CHUNKS, encoding="utf-8") as lines:
        chunks = [ChunkRecord.from_json(json.loads(line)) for line in lines]
    vectors = np.load(folder / "vectors.npy")
    if not len(chunks):
        return Snapshot(meta)
    return Snapshot.build(meta, chunks, vectors)


def prune_hnsw(collection_dir: Path, snapshot: Snapshot) -> None:
    """Remove the graphs of a generation folder that its manifest no longer counts."""
    saved = snapshot.saved
    if saved is None:
        return
    keep = f"hnsw-{saved.hnsw_rows}.faiss"
    for graph in (collection_dir / saved.generation).glob("hnsw-*.faiss"):
        if graph.name != keep:
            graph.unlink(missing_ok=True)

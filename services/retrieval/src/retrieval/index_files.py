"""A collection's files: one generation folder, appended to, never rewritten.

```
<collection>/CURRENT                  names the live generation (replaced by rename)
<collection>/g<version>-<id>/manifest.json      the state the generation started from (written once)
                             vectors.f32        float32 rows, little-endian, appended
                             chunks.jsonl       one chunk a line, and after each change a commit line, appended
                             hnsw-<rows>.faiss  the HNSW graph over the first rows, when built
```

A change appends its vectors and fsyncs them, then appends its chunks and a
commit line (`{"commit": {version, jobs, rows, dimensions, hnsw_rows}}`) and
fsyncs that: two fsyncs whatever the collection holds. Only what a commit line
counts exists, so a crash mid-append leaves the previous state (the next append
cuts the files back first). A change that removes rows, or a snapshot with no
generation on disk, writes a new generation in a temporary folder, renames it
and then CURRENT, so a crash leaves either the old or the new state, never a mix.
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


def _manifest(snapshot: Snapshot, chunk_bytes: int, hnsw_rows: int) -> bytes:
    return orjson.dumps(
        {"meta": snapshot.meta.to_json(), "rows": snapshot.n, "chunk_bytes": chunk_bytes, "hnsw_rows": hnsw_rows}
    )


def _new_jobs(meta: Meta, saved: Meta | None) -> list[str]:
    """The jobs `meta` lists that the saved state did not (applied_jobs only ever grows at its end)."""
    if saved is None or not saved.applied_jobs:
        return list(meta.applied_jobs)
    last = saved.applied_jobs[-1]
    for i in range(len(meta.applied_jobs) - 1, -1, -1):
        if meta.applied_jobs[i] == last:
            return list(meta.applied_jobs[i + 1 :])
    return list(meta.applied_jobs)


def _commit_line(snapshot: Snapshot, saved: SavedState, hnsw_rows: int) -> bytes:
    meta = snapshot.meta
    commit = {
        "version": meta.version,
        "jobs": _new_jobs(meta, saved.meta),
        "rows": snapshot.n,
        "dimensions": meta.dimensions,
        "hnsw_rows": hnsw_rows,
    }
    return orjson.dumps({"commit": commit}) + b"\n"


def _append(snapshot: Snapshot, folder: Path, saved: SavedState) -> Snapshot:
    new_chunks = snapshot.chunks[saved.rows : snapshot.n]
    if len(new_chunks):
        vectors = np.ascontiguousarray(snapshot.vectors[saved.rows :], dtype="<f4")
        _append_bytes(folder / VECTORS, saved.rows * vectors.shape[1] * 4, vectors.tobytes())
    hnsw_rows = saved.hnsw_rows if (folder / f"hnsw-{saved.hnsw_rows}.faiss").exists() else 0
    data = _encode(new_chunks) + _commit_line(snapshot, saved, hnsw_rows)
    _append_bytes(folder / CHUNKS, saved.chunk_bytes, data)  # the commit: after the vectors are durable
    state = SavedState(saved.generation, snapshot.n, saved.chunk_bytes + len(data), hnsw_rows, snapshot.meta)
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
    write_atomic(tmp / MANIFEST, _manifest(snapshot, len(data), hnsw_rows))
    fsync_dir(tmp)
    os.replace(tmp, collection_dir / generation)
    write_atomic(collection_dir / "CURRENT", generation.encode())
    for old in collection_dir.iterdir():
        if old.name not in (generation, "CURRENT") and old.name[:1] in ("g", "v", "."):
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    saved = SavedState(generation, snapshot.n, len(data), hnsw_rows, snapshot.meta)
    return replace(snapshot, saved=saved)


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
    rows, committed, hnsw_rows = int(manifest["rows"]), int(manifest["chunk_bytes"]), int(manifest["hnsw_rows"])
    data = (folder / CHUNKS).read_bytes()
    chunks = [ChunkRecord.from_json(orjson.loads(line)) for line in data[:committed].splitlines()]
    if len(chunks) != rows:
        raise ValueError(f"{folder}: the manifest counts {rows} chunks, the file holds {len(chunks)}")
    pending: list[ChunkRecord] = []
    offset = committed
    for line in data[committed:].splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break  # cut short by a crash: not committed
        try:
            raw = orjson.loads(line)
        except orjson.JSONDecodeError:
            break  # a torn write: nothing from here on was committed
        offset += len(line)
        if "commit" not in raw:
            pending.append(ChunkRecord.from_json(raw))
            continue
        commit = raw["commit"]
        chunks += pending
        pending = []
        committed = offset
        if len(chunks) != commit["rows"]:
            raise ValueError(f"{folder}: a commit counts {commit['rows']} chunks, the file holds {len(chunks)}")
        meta = replace(
            meta,
            version=commit["version"],
            applied_jobs=(*meta.applied_jobs, *commit["jobs"])[-1000:],
            dimensions=commit["dimensions"],
        )
        hnsw_rows = commit["hnsw_rows"]
    rows, dims = len(chunks), meta.dimensions
    vectors = (
        np.fromfile(folder / VECTORS, dtype="<f4", count=rows * dims).reshape(rows, dims)
        if rows
        else np.zeros((0, dims), np.float32)
    )
    snapshot = Snapshot.build(meta, chunks, vectors)
    graph = folder / f"hnsw-{hnsw_rows}.faiss"
    if hnsw_rows and graph.exists():
        index: Any = faiss.read_index(str(graph))
        index.hnsw.efSearch = params.hnsw_ef_search
        snapshot = replace(snapshot, hnsw=HnswBase(index, hnsw_rows))
    else:
        hnsw_rows = 0
    return replace(snapshot, saved=SavedState(current, rows, committed, hnsw_rows, meta))


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

"""Ending a batch: its output and error files, written once, then its final status.

Whoever sees a batch ready to end (the worker that stored its last result, a status read,
the sweeper) asks the store to close it; one caller wins the close and writes the files.
Results are frozen from the close on, so the files and the counts agree. A line without a
result (the window ran out, the batch was cancelled) gets an error record in the error file
(`batch_expired`, `batch_cancelled`) and counts as failed.

File ids follow from the batch id, so a finalizer that takes over from one that died
rewrites the same files (whole, by rename) instead of adding a second set.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson

from preprocess.batches.store import BatchStore
from preprocess.files import FileStore
from ragmesh.errors import ErrorKind, RagmeshError

log = logging.getLogger(__name__)

# Seconds a finalizer may hold a batch before another one may take its work over.
FINALIZE_LEASE = 120.0
# Results read per Redis round trip while the files are written.
CHUNK = 1000

_MISSING = {
    "expired": RagmeshError(
        ErrorKind.DEADLINE,
        "This request could not be executed before the completion window expired.",
        code="batch_expired",
    ),
    "cancelled": RagmeshError(
        ErrorKind.CANCELLED, "The batch was cancelled before this line ran.", code="batch_cancelled"
    ),
}


def output_file_id(batch_id: str) -> str:
    return f"file-{batch_id.removeprefix('batch_')}-output"


def error_file_id(batch_id: str) -> str:
    return f"file-{batch_id.removeprefix('batch_')}-errors"


def line_result(
    batch_id: str, custom_id: str, response: dict[str, Any] | None, err: RagmeshError | None, rid: str | None
) -> dict[str, Any]:
    """One line's record in an output or error file (OpenAI's batch output line); its id is the
    same whoever writes it, so a record written twice is the same record."""
    digest = hashlib.sha256(f"{batch_id}/{custom_id}".encode()).hexdigest()[:32]
    record: dict[str, Any] = {"id": f"batch_req_{digest}", "custom_id": custom_id}
    if err is None:
        record.update(response={"status_code": 200, "request_id": rid, "body": response}, error=None)
    else:
        record.update(
            response={"status_code": err.http_status, "request_id": rid, "body": err.to_openai()},
            error={"code": err.code or err.kind.value, "message": err.message},
        )
    return record


@dataclass
class _Sink:
    """Writes the two files (in a worker thread): good lines to one, failed lines to the other."""

    batch_id: str
    good_path: Path
    bad_path: Path
    missing: RagmeshError | None
    good: int = 0
    bad: int = 0
    _files: dict[str, IO[bytes]] = field(default_factory=dict)

    def write(self, custom_ids: list[str], values: list[bytes | None]) -> None:
        for custom_id, raw in zip(custom_ids, values, strict=True):
            if raw is None:
                if self.missing is None:  # cannot happen: a completed batch has every result
                    continue
                raw = orjson.dumps(line_result(self.batch_id, custom_id, None, self.missing, None))
                ok = False
            else:
                ok = orjson.loads(raw).get("error") is None
            self._out(ok).write(raw + b"\n")
            if ok:
                self.good += 1
            else:
                self.bad += 1

    def _out(self, ok: bool) -> IO[bytes]:
        name = "good" if ok else "bad"
        if name not in self._files:
            self._files[name] = open(self.good_path if ok else self.bad_path, "wb")  # noqa: SIM115 - closed in close()
        return self._files[name]

    def close(self) -> None:
        for out in self._files.values():
            out.flush()
            os.fsync(out.fileno())
            out.close()

    def discard(self) -> None:
        for out in self._files.values():
            out.close()
        self.good_path.unlink(missing_ok=True)
        self.bad_path.unlink(missing_ok=True)


class Finalizer:
    def __init__(self, store: BatchStore, files: FileStore, retention: float, clock: Callable[[], float]) -> None:
        self._store = store
        self._files = files
        self._retention = retention
        self._clock = clock

    async def maybe_finalize(self, batch_id: str) -> None:
        """End the batch if every line has its result (or take over a finalizer that died)."""
        ending = await self._store.begin_close(batch_id, "done", self._clock(), FINALIZE_LEASE)
        if ending:
            await self._write(batch_id, ending)

    async def expire(self, batch_id: str) -> None:
        """End a batch whose completion window is over: lines without a result fail with
        batch_expired (or batch_cancelled, for a batch being cancelled)."""
        ending = await self._store.begin_close(batch_id, "expire", self._clock(), FINALIZE_LEASE)
        if ending:
            await self._write(batch_id, ending)

    async def _write(self, batch_id: str, ending: str) -> None:
        batch = await self._store.load(batch_id)
        order = await self._store.order(batch_id)
        good_id, bad_id = output_file_id(batch_id), error_file_id(batch_id)
        sink = _Sink(batch_id, self._files.temp_path(good_id), self._files.temp_path(bad_id), _MISSING.get(ending))
        try:
            for begin in range(0, len(order), CHUNK):
                ids = order[begin : begin + CHUNK]
                values = await self._store.results_of(batch_id, ids)
                await asyncio.to_thread(sink.write, ids, values)
            await asyncio.to_thread(sink.close)
        except BaseException:
            await asyncio.to_thread(sink.discard)
            raise
        now = self._clock()
        owner = batch.get("owner")
        fields: dict[str, str | int] = {"completed": sink.good, "failed": sink.bad}
        if sink.good:
            await self._files.put_path(
                sink.good_path, good_id, f"{batch_id}_output.jsonl", "batch_output", sink.good, owner, now
            )
            fields["output_file_id"] = good_id
        if sink.bad:
            await self._files.put_path(
                sink.bad_path, bad_id, f"{batch_id}_error.jsonl", "batch_output", sink.bad, owner, now
            )
            fields["error_file_id"] = bad_id
        if await self._store.finish(batch_id, ending, int(now), now + self._retention, **fields):
            log.info("batch finished", extra={"batch": batch_id, "status": ending, "ok": sink.good, "failed": sink.bad})

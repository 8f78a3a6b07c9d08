"""OpenAI Files: batch input files uploaded by clients, and the output files batches write.

Contents live in a folder every preprocess replica can read (a shared volume
in a cluster); their descriptions live in Redis, so any replica answers for
any file. A file is written to a temporary name and renamed, so a reader never
sees half of one. An upload is validated whole before anything is kept.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis

from preprocess.serving.operations import BATCH_URLS
from ragmesh.durable import write_atomic
from ragmesh.errors import ErrorKind, RagmeshError, invalid_request

PURPOSES = ("batch", "batch_output")


@dataclass(frozen=True)
class BatchLine:
    custom_id: str
    url: str
    body: dict[str, Any]


def parse_batch_lines(data: bytes, max_lines: int) -> list[BatchLine]:
    """The lines of a batch input file; 400 naming the line of the first problem."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise invalid_request("The file is not UTF-8 text.", param="file") from None
    lines: list[BatchLine] = []
    seen: set[str] = set()
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            item = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise invalid_request(f"Line {number} is not JSON: the file must be JSONL.", param="file") from None
        if not isinstance(item, dict):
            raise invalid_request(f"Line {number} is not a JSON object.", param="file")
        custom_id = item.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            raise invalid_request(f"Line {number} has no custom_id.", param="file")
        if custom_id in seen:
            raise invalid_request(f"Line {number}: custom_id {custom_id!r} appears twice.", param="file")
        seen.add(custom_id)
        if item.get("method", "POST") != "POST":
            raise invalid_request(f"Line {number}: method must be POST.", param="file")
        url = item.get("url")
        if url not in BATCH_URLS:
            raise invalid_request(f"Line {number}: url {url!r} is not one of {', '.join(BATCH_URLS)}.", param="file")
        if not isinstance(item.get("body"), dict):
            raise invalid_request(f"Line {number}: body must be a JSON object.", param="file")
        lines.append(BatchLine(custom_id, url, item["body"]))
        if len(lines) > max_lines:
            raise RagmeshError(
                ErrorKind.PAYLOAD_TOO_LARGE, f"A batch file holds at most {max_lines} lines.", param="file"
            )
    if not lines:
        raise invalid_request("The file has no lines.", param="file")
    return lines


class FileStore:
    def __init__(self, redis: aioredis.Redis, directory: Path, namespace: str) -> None:
        self._redis = redis
        self._dir = directory
        self._prefix = f"{namespace or 'ragmesh'}:file:"

    def path(self, file_id: str) -> Path:
        return self._dir / f"{file_id}.jsonl"

    async def put(self, data: bytes, filename: str, purpose: str, lines: int, owner: str | None) -> dict[str, Any]:
        """Keep a file (contents first, then its description) and return OpenAI's file object.

        `owner`: the API key id that uploaded it (None with auth off); only that key sees it."""
        file_id = f"file-{uuid.uuid4().hex}"
        await asyncio.to_thread(write_atomic, self.path(file_id), data)
        info = {
            "id": file_id,
            "object": "file",
            "bytes": len(data),
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
            "lines": lines,
            "owner": owner,
        }
        await self._redis.set(self._prefix + file_id, orjson.dumps(info))
        return _public(info)

    async def info(self, file_id: str, owner: str | None) -> dict[str, Any]:
        """The file object; a file another key owns is absent (`owner` None: no check, auth is off)."""
        raw = await self._redis.get(self._prefix + file_id)
        info = orjson.loads(raw) if raw is not None else None
        if info is None or (owner is not None and info.get("owner") != owner):
            raise RagmeshError(ErrorKind.NOT_FOUND, f"No such file: {file_id}.", param="file_id", code="file_not_found")
        return _public(info)

    async def content(self, file_id: str, owner: str | None) -> bytes:
        await self.info(file_id, owner)
        try:
            return await asyncio.to_thread(self.path(file_id).read_bytes)
        except FileNotFoundError:
            raise RagmeshError(
                ErrorKind.NOT_FOUND, f"The contents of {file_id} are gone.", param="file_id", code="file_not_found"
            ) from None


def _public(info: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in info.items() if k not in ("lines", "owner")}

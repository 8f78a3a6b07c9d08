"""Batch input files and the messages their lines travel in.

A file is checked whole before anything is kept (JSONL, a unique custom_id per line, a
supported url); each line then becomes one persistent message on the requests queue.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from preprocess.serving.operations import BATCH_URLS
from ragmesh.errors import ErrorKind, RagmeshError, invalid_request

__all__ = ["BATCH_URLS", "LINE_TYPE", "SCHEMA_VERSION", "BatchLine", "parse_batch_lines"]
# Version of the JSON bodies on the requests queue (batch lines and direct-protocol requests).
SCHEMA_VERSION = 1
LINE_TYPE = "ragmesh.batch-line.v1"


@dataclass(frozen=True)
class BatchLine:
    custom_id: str
    url: str
    body: dict[str, Any]


def parse_batch_lines(data: bytes, max_lines: int) -> list[BatchLine]:
    """The lines of a batch input file; 400 naming the line of the first problem (CPU work on
    up to the file size limit: call it from a thread in async code)."""
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


def line_body(batch_id: str, line: BatchLine, owner: str | None = None) -> bytes:
    """The message body of one batch line (`owner`: the id of the key it runs for)."""
    return orjson.dumps(
        {
            "v": SCHEMA_VERSION,
            "batch_id": batch_id,
            "custom_id": line.custom_id,
            "url": line.url,
            "body": line.body,
            "owner": owner,
        }
    )


@dataclass(frozen=True)
class Request:
    """A decoded message of the requests queue: a batch line (batch_id set) or a direct request."""

    url: str
    body: dict[str, Any]
    batch_id: str | None = None
    custom_id: str | None = None
    owner: str | None = None  # a batch line's key id (checked and charged like HTTP)


class UnreadableError(Exception):
    """A message that is not a request this version can read (says why)."""


def decode_request(raw: bytes) -> Request:
    """The request a message carries; UnreadableError when it is not JSON, not version 1, or malformed."""
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise UnreadableError("The message body is not JSON.") from None
    if not isinstance(payload, dict):
        raise UnreadableError("The message body is not a JSON object.")
    if payload.get("v", SCHEMA_VERSION) != SCHEMA_VERSION:
        raise UnreadableError(
            f"Unsupported protocol version {payload.get('v')!r}; this server speaks v{SCHEMA_VERSION}."
        )
    url, body = payload.get("url"), payload.get("body")
    if not isinstance(url, str) or not isinstance(body, dict):
        raise UnreadableError("The message needs 'url' (a string) and 'body' (a JSON object).")
    batch_id, custom_id = payload.get("batch_id"), payload.get("custom_id")
    if batch_id is not None and (not isinstance(batch_id, str) or not isinstance(custom_id, str)):
        raise UnreadableError("A batch line needs 'batch_id' and 'custom_id' strings.")
    owner = payload.get("owner") if batch_id is not None else None
    return Request(url, body, batch_id, custom_id, owner if isinstance(owner, str) else None)

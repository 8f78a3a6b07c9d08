"""HTTP plumbing for OpenAI endpoints: JSON bodies, uploads, client disconnects."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

import orjson
from starlette.requests import Request

from ragmesh.errors import ErrorKind, RagmeshError

T = TypeVar("T")

_JSON_TYPES = ("application/json", "text/json")


async def read_json(request: Request, max_bytes: int) -> Any:
    """The decoded JSON body; 415 for another content type, 413 over the limit, 400 if malformed."""
    content_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if content_type not in _JSON_TYPES and not content_type.endswith("+json"):
        raise RagmeshError(
            ErrorKind.UNSUPPORTED_MEDIA_TYPE,
            f"Unsupported Content-Type '{content_type}': send the request body as application/json.",
        )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > max_bytes:
            raise _too_large(max_bytes)
    if not body:
        raise RagmeshError(ErrorKind.INVALID_REQUEST, "The request body is empty; send a JSON object.")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise RagmeshError(
            ErrorKind.INVALID_REQUEST,
            f"We could not parse the JSON body of your request ({exc.msg} at position {exc.pos}).",
            code="invalid_json",
        ) from None


def _too_large(max_bytes: int) -> RagmeshError:
    return RagmeshError(ErrorKind.PAYLOAD_TOO_LARGE, f"The request body is larger than {max_bytes} bytes.")


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Run `work`, cancelling it if the client goes away first (the body must be read already)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if not task.done() or task.cancelled():
        raise RagmeshError(ErrorKind.CANCELLED, "The client closed the connection.")
    return task.result()


async def read_upload(request: Request, max_bytes: int) -> tuple[bytes, str, str]:
    """(contents, filename, purpose) of a multipart upload with `file` and `purpose` fields."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise RagmeshError(
            ErrorKind.UNSUPPORTED_MEDIA_TYPE, "Upload files as multipart/form-data with 'file' and 'purpose' fields."
        )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes + 64 * 1024:
        raise _too_large(max_bytes)
    form = await request.form(max_part_size=max_bytes + 1)
    upload = form.get("file")
    purpose = form.get("purpose")
    if upload is None or isinstance(upload, str):
        raise RagmeshError(ErrorKind.INVALID_REQUEST, "The 'file' field is missing.", param="file")
    if not isinstance(purpose, str):
        raise RagmeshError(ErrorKind.INVALID_REQUEST, "The 'purpose' field is missing.", param="purpose")
    data = await upload.read()
    if len(data) > max_bytes:
        raise _too_large(max_bytes)
    return data, upload.filename or "upload.jsonl", purpose


async def read_raw(request: Request, max_bytes: int) -> bytes:
    """The body as sent (any content type, maybe empty); 413 over the limit."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > max_bytes:
            raise _too_large(max_bytes)
    return bytes(body)

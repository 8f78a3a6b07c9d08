"""Server-sent events as OpenAI streams them: `data: <json>` events, then `data: [DONE]`."""

from __future__ import annotations

import orjson

from ragmesh.errors import RagmeshError

SSE_DONE = b"data: [DONE]\n\n"

SSE_HEADERS = {
    "Cache-Control": "no-cache",
    # Tells nginx not to buffer this response even if buffering is on for the location.
    "X-Accel-Buffering": "no",
}


def sse_event(data: str | bytes) -> bytes:
    """One server-sent event carrying `data`."""
    if isinstance(data, str):
        data = data.encode()
    return b"data: " + data + b"\n\n"


def sse_error(err: RagmeshError) -> bytes:
    """The tail of a stream that failed after it started: an error event, then [DONE]."""
    return sse_event(orjson.dumps(err.to_openai())) + SSE_DONE

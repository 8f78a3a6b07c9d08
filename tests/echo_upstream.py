"""An OpenAI-compatible upstream that answers with the last user message, for the console's tests.

The browser tests need an answer whose text they choose (markup that must be shown as
text, not run): this model says back what it was told, streamed a few characters a chunk.
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .conftest import free_port

ECHO_MODEL = "test/echo"


def _last_user_text(body: dict[str, Any]) -> str:
    for message in reversed(body.get("messages") or []):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                return "".join(p.get("text", "") for p in content if isinstance(p, dict))
            return str(content or "")
    return ""


async def _chat(request: Request) -> Response:
    body = orjson.loads(await request.body())
    text = _last_user_text(body)
    usage = {
        "prompt_tokens": 5,
        "completion_tokens": max(1, len(text) // 4),
        "total_tokens": 5 + max(1, len(text) // 4),
    }
    if not body.get("stream"):
        message = {"role": "assistant", "content": text}
        return JSONResponse(
            {
                "id": "chatcmpl-echo",
                "object": "chat.completion",
                "created": 1,
                "model": body.get("model"),
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                "usage": usage,
            }
        )
    pieces = [text[i : i + 4] for i in range(0, len(text), 4)]
    events: list[dict[str, Any]] = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}]
    events += [{"choices": [{"index": 0, "delta": {"content": p}}]} for p in pieces]
    events.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    if (body.get("stream_options") or {}).get("include_usage"):
        events.append({"choices": [], "usage": usage})

    async def stream() -> AsyncIterator[bytes]:
        for event in events:
            yield (
                b"data: "
                + orjson.dumps(
                    {
                        "id": "chatcmpl-echo",
                        "object": "chat.completion.chunk",
                        "created": 1,
                        "model": body.get("model"),
                        **event,
                    }
                )
                + b"\n\n"
            )
        yield b"data: [DONE]\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream")


class EchoUpstream:
    """Serves the echo model on a free port, in a thread, while the `with` block runs."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> EchoUpstream:
        app = Starlette(routes=[Route("/v1/chat/completions", _chat, methods=["POST"])])
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            assert time.monotonic() < deadline, "echo upstream did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(10)

    def backend_entry(self) -> str:
        """Its entry in a backends file."""
        return f"  - name: echo\n    type: openai\n    base_url: {self.url}\n    models: [{ECHO_MODEL}]\n"

"""OpenAI- and NIM-shaped upstreams written for the tests: they answer by script and record what they got.

One uvicorn server in a thread serves several backends, each under its own
prefix (`http://127.0.0.1:PORT/<backend>/v1`), so one backends file can name
a vision model, a QA model, an embedding model, a reranker and a path-only
backend. Every request is kept in `seen` (backend, method, path, headers,
body) for the tests to check what reached the upstream, and with which key.
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .conftest import free_port

SPEECH = b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(range(64))  # a binary body, in two parts


@dataclass
class Seen:
    backend: str
    method: str
    path: str
    headers: dict[str, str]
    body: Any  # the decoded JSON, or the raw bytes


@dataclass
class ScriptedUpstreams:
    port: int = field(default_factory=free_port)
    # A port nothing listens on: a backend that is down.
    closed_port: int = field(default_factory=free_port)
    seen: list[Seen] = field(default_factory=list)

    def url(self, backend: str) -> str:
        return f"http://127.0.0.1:{self.port}/{backend}/v1"

    def last(self, backend: str, path: str) -> Seen:
        return next(s for s in reversed(self.seen) if s.backend == backend and s.path == path)

    def __enter__(self) -> ScriptedUpstreams:
        routes = [Route("/{backend}/v1/{path:path}", self._answer, methods=["GET", "POST", "PUT", "DELETE"])]
        self._server = uvicorn.Server(
            uvicorn.Config(Starlette(routes=routes), host="127.0.0.1", port=self.port, log_level="warning")
        )
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            assert time.monotonic() < deadline, "scripted upstream did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(10)

    async def _answer(self, request: Request) -> Response:
        backend, path = request.path_params["backend"], "/" + request.path_params["path"]
        raw = await request.body()
        try:
            body: Any = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = raw
        self.seen.append(Seen(backend, request.method, path, {k.lower(): v for k, v in request.headers.items()}, body))
        if path == "/chat/completions":
            return _chat(backend, body)
        if path == "/embeddings":
            return _embeddings(body)
        if path == "/ranking":
            passages = body.get("passages", [])
            ranked = sorted(range(len(passages)), key=lambda i: -len(passages[i]["text"]))
            return JSONResponse({"rankings": [{"index": i, "logit": float(len(passages[i]["text"]))} for i in ranked]})
        if path == "/responses":
            return StreamingResponse(_response_events(), media_type="text/event-stream")
        if path == "/audio/speech":
            return StreamingResponse(_two_parts(SPEECH), media_type="audio/wav")
        return JSONResponse({"error": {"message": f"no {path} here"}}, status_code=404)


def _chat(backend: str, body: dict[str, Any]) -> Response:
    text = f"scripted answer from {backend}"
    model = body.get("model", "?")
    if not body.get("stream"):
        return JSONResponse(
            {
                "id": "chatcmpl-scripted",
                "object": "chat.completion",
                "created": 1,
                "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9},
            }
        )
    words = text.split(" ")
    events: list[dict[str, Any]] = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}]
    events += [{"choices": [{"index": 0, "delta": {"content": w + " "}}]} for w in words]
    events.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    if (body.get("stream_options") or {}).get("include_usage"):
        events.append({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}})

    async def stream() -> AsyncIterator[bytes]:
        for event in events:
            yield b"data: " + orjson.dumps({"id": "chatcmpl-scripted", "model": model, **event}) + b"\n\n"
        yield b"data: [DONE]\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream")


def _embeddings(body: dict[str, Any]) -> Response:
    inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
    dims = int(body.get("dimensions") or 4)
    # The vector says what the upstream was asked: 1.0 first for a query, 2.0 for a passage.
    first = {"query": 1.0, "passage": 2.0}.get(body.get("input_type", ""), 0.0)
    data = [
        {"object": "embedding", "index": i, "embedding": [first, float(len(text))] + [0.5] * (dims - 2)}
        for i, text in enumerate(inputs)
    ]
    usage = {"prompt_tokens": len(inputs), "total_tokens": len(inputs)}
    return JSONResponse({"object": "list", "data": data, "model": body["model"], "usage": usage})


async def _response_events() -> AsyncIterator[bytes]:
    for i, word in enumerate(["forwarded ", "as ", "it ", "came"]):
        event = {"type": "response.output_text.delta", "sequence_number": i, "delta": word}
        yield b"event: response.output_text.delta\ndata: " + orjson.dumps(event) + b"\n\n"
    yield b'event: response.completed\ndata: {"type": "response.completed"}\n\n'


async def _two_parts(data: bytes) -> AsyncIterator[bytes]:
    half = len(data) // 2
    yield data[:half]
    yield data[half:]

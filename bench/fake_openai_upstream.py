"""A minimal OpenAI-compatible responder, written for the gateway benchmark.

It answers /v1/chat/completions at once with a fixed one-token answer
(streamed or not) and lists one model, so that a benchmark measures the
gateway in front of it and nothing else.

    python bench/fake_openai_upstream.py PORT
"""

from __future__ import annotations

import sys
import time

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

MODEL = "bench/echo"


async def models(request: Request) -> Response:
    body = {"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "bench"}]}
    return Response(orjson.dumps(body), media_type="application/json")


async def chat(request: Request) -> Response:
    asked = orjson.loads(await request.body())
    created = int(time.time())
    usage = {"prompt_tokens": 8, "completion_tokens": 1, "total_tokens": 9}
    if asked.get("stream"):
        chunks = [
            {
                "id": "b",
                "object": "chat.completion.chunk",
                "created": created,
                "model": MODEL,
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": "ok"}, "finish_reason": None}],
            },
            {
                "id": "b",
                "object": "chat.completion.chunk",
                "created": created,
                "model": MODEL,
                "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}],
            },
            {
                "id": "b",
                "object": "chat.completion.chunk",
                "created": created,
                "model": MODEL,
                "choices": [],
                "usage": usage,
            },
        ]
        payload = b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"
        return StreamingResponse(iter([payload]), media_type="text/event-stream")
    body = {
        "id": "b",
        "object": "chat.completion",
        "created": created,
        "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "length"}],
        "usage": usage,
    }
    return Response(orjson.dumps(body), media_type="application/json")


app = Starlette(routes=[Route("/v1/models", models), Route("/v1/chat/completions", chat, methods=["POST"])])

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False)

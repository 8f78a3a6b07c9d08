"""An upstream reranker written for the tests: NVIDIA NIM's /v1/ranking and the /v1/rerank shape.

It scores a document by the query words it contains (so the expected order is
known), requires a server-side key, records what it was sent, and can be made
to fail, answer garbage, hang (slow) or go away (down) on demand.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .conftest import free_port

RERANK_KEY = "rerank-server-secret"
NIM_MODEL = "nvidia/test-rerankqa"
COHERE_MODEL = "test/bge-reranker"


def overlap(query: str, document: str) -> int:
    """The upstream's score: how many of the query's words the document has."""
    words = set(re.findall(r"\w+", query.lower()))
    return len(words & set(re.findall(r"\w+", document.lower())))


@dataclass
class RerankFaults:
    fail: list[int] = field(default_factory=list)  # statuses to answer, one per request
    garbage: bool = False  # 200 with a body that is not the API's shape
    missing: bool = False  # 200 with scores for all but the last document
    hang: bool = False  # never answer (until the server stops)
    seen: list[dict[str, Any]] = field(default_factory=list)  # path, headers, body of every request


class RerankUpstream:
    """Serves both reranking APIs on a free port, in a thread of its own."""

    def __init__(self, key: str = RERANK_KEY) -> None:
        self.key = key
        self.faults = RerankFaults()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self._release = threading.Event()
        routes = [
            Route("/v1/ranking", self._ranking, methods=["POST"]),
            Route("/v1/rerank", self._rerank, methods=["POST"]),
        ]
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._app = Starlette(routes=routes)

    def start(self) -> RerankUpstream:
        self._release.clear()
        self._server = uvicorn.Server(uvicorn.Config(self._app, port=self.port, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            assert time.monotonic() < deadline, "rerank upstream did not start"
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        """Go down: connections are refused from now on."""
        self._release.set()  # hung requests end
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(10)
            self._server = None

    def __enter__(self) -> RerankUpstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _common(self, request: Request) -> tuple[dict[str, Any] | None, Response | None]:
        body = await request.json()
        self.faults.seen.append({"path": request.url.path, "headers": dict(request.headers), "body": body})
        if request.headers.get("authorization") != f"Bearer {self.key}":
            return None, JSONResponse({"error": {"message": "bad key"}}, status_code=401)
        if self.faults.hang:
            while not self._release.is_set():
                await asyncio.sleep(0.05)
            return None, Response(status_code=503)
        if self.faults.fail:
            status = self.faults.fail.pop(0)
            return None, JSONResponse({"error": {"message": f"injected {status}"}}, status_code=status)
        if self.faults.garbage:
            return None, Response(b"<html>oops</html>", media_type="text/html")
        return body, None

    async def _ranking(self, request: Request) -> Response:
        body, refusal = await self._common(request)
        if refusal is not None:
            return refusal
        assert body is not None
        query, passages = body["query"]["text"], [p["text"] for p in body["passages"]]
        scores = [float(overlap(query, p)) - 2.5 for p in passages]  # logits, some negative
        rankings = sorted(
            ({"index": i, "logit": s} for i, s in enumerate(scores)), key=lambda r: (-r["logit"], r["index"])
        )
        if self.faults.missing:
            rankings = [r for r in rankings if r["index"] != len(passages) - 1]
        return JSONResponse({"rankings": rankings})

    async def _rerank(self, request: Request) -> Response:
        body, refusal = await self._common(request)
        if refusal is not None:
            return refusal
        assert body is not None
        query, documents = body["query"], body["documents"]
        scores = [overlap(query, d) / (1 + len(query.split())) for d in documents]  # in [0, 1]
        results = sorted(
            ({"index": i, "relevance_score": s} for i, s in enumerate(scores)),
            key=lambda r: (-r["relevance_score"], r["index"]),
        )
        if self.faults.missing:
            results = [r for r in results if r["index"] != len(documents) - 1]
        tokens = sum(len(d.split()) + len(query.split()) for d in documents)
        return JSONResponse(
            {"id": "rerank-1", "model": body["model"], "results": results, "usage": {"total_tokens": tokens}}
        )


def rerank_backends_yaml(
    url: str,
    *,
    timeout: float = 30.0,
    attempts: int = 2,
    failures: int = 3,
    reset_after: float = 30.0,
    fallback_url: str | None = None,
) -> str:
    """A backends file with the upstream reranker in both shapes; with `fallback_url`, the NIM
    model falls back to the /v1/rerank one served there."""
    cohere_url = fallback_url or url
    routes = f"routes:\n  {NIM_MODEL}: {{fallback: [{COHERE_MODEL}]}}\n" if fallback_url else ""
    return (
        "backends:\n"
        "  - name: nim-rerank\n"
        "    type: openai\n"
        f"    base_url: {url}\n"
        "    api_key_env: TEST_RERANK_KEY\n"
        f"    timeout: {timeout}\n"
        f"    rerank: {{api: ranking, models: [{NIM_MODEL}]}}\n"
        "  - name: cohere-rerank\n"
        "    type: openai\n"
        f"    base_url: {cohere_url}\n"
        "    api_key_env: TEST_RERANK_KEY\n"
        f"    timeout: {timeout}\n"
        f"    rerank: {{api: rerank, models: [{COHERE_MODEL}]}}\n"
        f"retry: {{attempts: {attempts}, backoff_base: 0.01, backoff_max: 0.05}}\n"
        f"circuit_breaker: {{failures: {failures}, reset_after: {reset_after}}}\n"
        f"{routes}"
    )

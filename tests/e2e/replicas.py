"""What the replica tests share: a mesh's replicas, their metrics, short requests, steady load.

The tests themselves are in test_replicas.py (one mesh with two replicas of every service).
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import httpx2  # the openai client's own HTTP library
import openai
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from .conftest import MODEL, Mesh

SERVICES = ("inference", "retrieval", "postprocess", "preprocess")
EMBEDDING_MODEL = "all-MiniLM-L6-v2"


@dataclass
class Replicated:
    """A running mesh with several replicas per service, and where each one listens."""

    mesh: Mesh
    # service -> [{"program", "http", "grpc"}], as `make up` wrote run/mesh.json
    replicas: dict[str, list[dict[str, Any]]]

    def metrics(self, service: str, index: int) -> str:
        """One replica's /metrics text."""
        port = self.replicas[service][index]["http"]
        return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text

    def ready(self, service: str, index: int) -> bool:
        """Whether one replica answers its readiness probe with 200."""
        port = self.replicas[service][index]["http"]
        try:
            return httpx.get(f"http://127.0.0.1:{port}/v1/health/ready", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def program(self, service: str, index: int) -> str:
        """One replica's supervisord program name."""
        return str(self.replicas[service][index]["program"])


def calls(metrics: str, method: str) -> float:
    """Calls a gRPC server handled for one method (every status)."""
    pattern = rf'^ragmesh_grpc_server_requests_total\{{[^}}]*method="/ragmesh\.v1\.{method}"[^}}]*\}} (\S+)$'
    return sum(float(value) for value in re.findall(pattern, metrics, re.M))


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `predicate` until it holds; fail the test naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not after {timeout:.0f} s"
        time.sleep(0.2)


HELLO: list[Any] = [{"role": "user", "content": "Say hello."}]


def chat_body(**extra: Any) -> dict[str, Any]:
    """A short chat request's HTTP body."""
    return {"model": MODEL, "messages": HELLO, "max_tokens": 4, **extra}


def chat(client: openai.OpenAI, max_tokens: int = 4) -> ChatCompletion:
    """A short sampled chat answer (never from the response cache)."""
    return client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=max_tokens, temperature=0.8)


def stream_chat(client: openai.OpenAI, max_tokens: int = 4) -> list[ChatCompletionChunk]:
    """A short sampled streamed answer, every chunk of it (the client raises on an error event)."""
    stream = client.chat.completions.create(
        model=MODEL,
        messages=HELLO,
        max_tokens=max_tokens,
        temperature=0.8,
        stream=True,
        stream_options={"include_usage": True},
    )
    return list(stream)


def alive(pid: int) -> bool:
    """Whether a process with this pid still exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def refuses_connections(port: int) -> bool:
    """Nothing listens on this loopback port (a stopped or draining process)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return False
    except OSError:
        return True


def engine_requests(replicated: Replicated, index: int) -> float:
    """Requests an inference replica holds: generating in a slot, or admitted and waiting for one."""
    text = replicated.metrics("inference", index)
    pattern = r"^ragmesh:num_requests_(?:running|waiting)\{[^}]*\} (\S+)$"
    return sum(float(v) for v in re.findall(pattern, text, re.M))


@dataclass
class Load:
    """Steady mixed traffic through the gateway until stopped; every outcome recorded."""

    mesh: Mesh
    stop: threading.Event = field(default_factory=threading.Event)
    done: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        for work in (self._streams, self._chats, self._searches, self._embeddings):
            thread = threading.Thread(target=self._loop, args=(work,), daemon=True)
            thread.start()
            self.threads.append(thread)

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(180)

    def _loop(self, work: Callable[[openai.OpenAI, httpx.Client], str]) -> None:
        # A connection per request: nginx's reload (a preprocess replica in or out of
        # rotation) closes idle keep-alive connections, and a request written onto one
        # at that instant is lost in transit. That race belongs to HTTP/1.1 keep-alive
        # itself (clients retry it: the openai SDK does by default); with retries off
        # here, it would hide what this test looks for, a request the mesh dropped.
        client = self.mesh.openai(
            timeout=120, http_client=openai.DefaultHttpxClient(limits=httpx2.Limits(max_keepalive_connections=0))
        )
        http = httpx.Client(base_url=self.mesh.v1, timeout=120, limits=httpx.Limits(max_keepalive_connections=0))
        while not self.stop.is_set():
            try:
                self.done[work(client, http)] += 1
            except Exception as exc:  # noqa: BLE001 - every failure is the test's business
                self.failures.append(f"{work.__name__}: {exc!r}")
            time.sleep(0.05)
        http.close()

    @staticmethod
    def _streams(client: openai.OpenAI, http: httpx.Client) -> str:
        chunks = stream_chat(client, max_tokens=24)
        # Whole: a finish_reason, then the usage chunk (the client raised on an error event).
        assert [c for c in chunks if c.choices and c.choices[0].finish_reason], "stream ended without finishing"
        assert chunks[-1].usage is not None, "stream ended before its usage chunk"
        return "stream"

    @staticmethod
    def _chats(client: openai.OpenAI, http: httpx.Client) -> str:
        reply = chat(client, max_tokens=8)
        assert reply.choices[0].finish_reason in ("stop", "length")
        return "chat"

    @staticmethod
    def _searches(client: openai.OpenAI, http: httpx.Client) -> str:
        reply = http.post("/search", json={"collection": "rollout", "query": "moon and sea", "top_k": 3})
        assert reply.status_code == 200 and len(reply.json()["results"]) == 3, reply.text
        return "search"

    @staticmethod
    def _embeddings(client: openai.OpenAI, http: httpx.Client) -> str:
        reply = client.embeddings.create(model=EMBEDDING_MODEL, input=["rolling out", f"at {time.time()}"])
        assert len(reply.data) == 2 and len(reply.data[0].embedding) == 384
        return "embedding"

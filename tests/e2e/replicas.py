"""What the replica tests share: a mesh's replicas, their metrics, short requests, steady load.

The tests themselves are in test_replicas.py (one mesh with two replicas of every service).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import grpc
import httpx
import httpx2  # the openai client's own HTTP library
import openai
from openai.types import Batch
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from ragmesh.v1 import retrieval_pb2, retrieval_pb2_grpc

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


def consumers(mesh: Mesh, base: str) -> int:
    """Consumers the broker counts on one of the mesh's queues (a passive declare: read only)."""
    url = mesh.env.get("RAGMESH_AMQP_URL") or mesh.env.get("AMQP_URL") or "amqp://guest:guest@127.0.0.1:5672/"

    async def count() -> int:
        connection = await aio_pika.connect(url)
        async with connection:
            channel = await connection.channel()
            queue = await channel.declare_queue(f"{mesh.env['RAGMESH_NAMESPACE']}.{base}", passive=True)
            return int(queue.declaration_result.consumer_count or 0)

    return asyncio.run(count())


def engine_requests(replicated: Replicated, index: int) -> float:
    """Requests an inference replica holds: generating in a slot, or admitted and waiting for one."""
    text = replicated.metrics("inference", index)
    pattern = r"^ragmesh:num_requests_(?:running|waiting)\{[^}]*\} (\S+)$"
    return sum(float(v) for v in re.findall(pattern, text, re.M))


def first_tokens(replicated: Replicated, index: int) -> float:
    """Choices an inference replica has produced a first token for (its TTFT histogram's count):
    such a call has sent a response message, so gRPC will not retry it elsewhere."""
    text = replicated.metrics("inference", index)
    match = re.search(r"^ragmesh_inference_time_to_first_token_seconds_count (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def restart(replicated: Replicated, service: str, index: int) -> None:
    """Start a stopped replica again and wait until it is ready."""
    program = replicated.program(service, index)
    assert f"{program}: started" in replicated.mesh.supervisorctl("start", program)
    wait_until(lambda: replicated.ready(service, index), 120, f"{program} back")


# SmolLM2's <|endoftext|> and <|im_end|>: banned (logit_bias), an answer runs to max_tokens.
NO_EOS = {"0": -100, "2": -100}


def service_token(mesh: Mesh) -> str:
    """The mesh's gRPC service credential: the environment's, or the one make up made in its run folder."""
    return mesh.env.get("RAGMESH_SERVICE_TOKEN") or (mesh.run_dir / "service-token").read_text().strip()


def search_replica(
    port: int, collection: str, query: str, mode: retrieval_pb2.SearchMode.ValueType, token: str = ""
) -> list[tuple[str, float]]:
    """One retrieval replica's hits (chunk id, score), asked over gRPC with the service credential,
    bypassing every cache."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = retrieval_pb2_grpc.RetrievalStub(channel)
        request = retrieval_pb2.SearchRequest(collection=collection, query=query, top_k=5, mode=mode, no_cache=True)
        reply = stub.Search(request, timeout=30, metadata=(("ragmesh-service-token", token),))
    return [(hit.chunk_id, round(hit.score, 5)) for hit in reply.hits]


def start_batch(client: openai.OpenAI, lines: int) -> Batch:
    """A chat batch of `lines` short requests (custom_id line-<i>), uploaded and created."""
    requests = [
        {
            "custom_id": f"line-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": chat_body(max_tokens=8, messages=[{"role": "user", "content": f"Say {i}."}]),
        }
        for i in range(lines)
    ]
    body = b"".join(json.dumps(x).encode() + b"\n" for x in requests)
    uploaded = client.files.create(file=("lines.jsonl", io.BytesIO(body)), purpose="batch")
    return client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")


def wait_for_batch(client: openai.OpenAI, batch_id: str, timeout: float) -> Batch:
    """The batch once it is completed, failed, cancelled or expired."""
    deadline = time.monotonic() + timeout
    while (batch := client.batches.retrieve(batch_id)).status not in ("completed", "failed", "cancelled", "expired"):
        assert time.monotonic() < deadline, batch.request_counts
        time.sleep(1)
    return batch


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

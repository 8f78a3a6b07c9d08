"""The Postprocess gRPC servicer: drives a ProcessSession over the bidi stream."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from prometheus_client import Histogram

from postprocess.cache import ResponseCache
from postprocess.session import GuardConfig, ProcessSession
from ragmesh.errors import ErrorKind, RagmeshError, invalid_request
from ragmesh.grpc_server import ServicerContext
from ragmesh.v1 import postprocess_pb2, postprocess_pb2_grpc

# What this service adds to a request: the time spent on its chunks (stops, guardrails,
# citations, usage) and storing the answer in the response cache, not the time spent waiting
# for the engine's next chunk (bench/rag_stages.py reads it as the postprocess stage).
PROCESSING_SECONDS = Histogram(
    "ragmesh_postprocess_processing_seconds",
    "Time a Process call spends handling its chunks (waits for the next chunk left out)",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
)


class PostprocessServicer(postprocess_pb2_grpc.PostprocessServicer):
    def __init__(self, guards: GuardConfig, cache: ResponseCache | None) -> None:
        self._guards = guards
        self._cache = cache

    async def Process(  # noqa: N802 - gRPC method name
        self,
        request_iterator: AsyncIterator[postprocess_pb2.ProcessRequest],
        context: ServicerContext,
    ) -> AsyncIterator[postprocess_pb2.ProcessResponse]:
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("msg") != "start":
            raise invalid_request("the first Process message must be a ProcessStart")
        start = first.start
        began = time.perf_counter()
        session = ProcessSession(start, self._guards)
        spent = time.perf_counter() - began
        async for message in request_iterator:
            if message.WhichOneof("msg") != "chunk":
                raise invalid_request("only one ProcessStart is allowed per call")
            began = time.perf_counter()
            responses = session.feed(message.chunk)
            if session.done and start.cache_key and self._cache is not None:
                # Before the last response: the caller cancels the call once it has it.
                await self._cache.store(start.cache_key, session.cache_record())
            spent += time.perf_counter() - began
            if session.done:
                PROCESSING_SECONDS.observe(spent)
            for response in responses:
                yield response
            if session.done:
                # The answer ended before the generation did (a stop sequence, a guardrail): take
                # the chunks still on their way until the caller half-closes or cancels, so that its
                # writes never meet a finished call (which fails the call's last reads too).
                async for _ in request_iterator:
                    pass
                return
        if not session.done:
            raise RagmeshError(ErrorKind.INTERNAL, "generation ended before every choice finished")

    async def ProcessWhole(  # noqa: N802
        self, request: postprocess_pb2.ProcessWholeRequest, context: ServicerContext
    ) -> postprocess_pb2.ProcessResponse:
        """Process for a non-streamed request whose generation is all in hand: the same session
        fed the same chunks, one unary call instead of a bidi stream."""
        start = request.start
        if start.stream:
            raise invalid_request("ProcessWhole answers non-streamed requests; streams use Process")
        began = time.perf_counter()
        session = ProcessSession(start, self._guards)
        responses: list[postprocess_pb2.ProcessResponse] = []
        for chunk in request.chunks:
            responses = session.feed(chunk)
            if session.done:
                break
        if not session.done:
            raise RagmeshError(ErrorKind.INTERNAL, "generation ended before every choice finished")
        if start.cache_key and self._cache is not None:
            await self._cache.store(start.cache_key, session.cache_record())
        PROCESSING_SECONDS.observe(time.perf_counter() - began)
        return responses[-1]

    async def Replay(  # noqa: N802
        self, request: postprocess_pb2.ProcessStart, context: ServicerContext
    ) -> AsyncIterator[postprocess_pb2.ProcessResponse]:
        record = await self._cache.load(request.cache_key) if self._cache and request.cache_key else None
        if record is None:
            raise RagmeshError(ErrorKind.NOT_FOUND, "no cached answer for this request", code="cache_miss")
        for response in ProcessSession(request, self._guards).replay(record):
            yield response

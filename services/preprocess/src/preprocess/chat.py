"""POST /v1/chat/completions: validate, normalise, run the pipeline, answer JSON or SSE."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator

from prometheus_client import Counter, Histogram
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from preprocess.clients import MeshClients
from preprocess.http_io import SSE_DONE, read_json, sse_error, sse_event, until_disconnect
from preprocess.normalize import normalize_text
from preprocess.pipeline import GenerationPipeline
from preprocess.protocol import ChatCompletionRequest, parse_chat_request
from preprocess.settings import PreprocessSettings
from ragmesh.errors import RagmeshError
from ragmesh.v1 import common_pb2, inference_pb2, postprocess_pb2

log = logging.getLogger(__name__)

TTFT = Histogram(
    "ragmesh_preprocess_time_to_first_token_seconds",
    "Time from request arrival to the first content chunk sent (streaming)",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
COMPLETIONS = Counter("ragmesh_preprocess_chat_completions_total", "Chat completions by outcome", ["stream", "outcome"])

SSE_HEADERS = {
    "Cache-Control": "no-cache",
    # Tells nginx not to buffer this response even if buffering is on for the location.
    "X-Accel-Buffering": "no",
}


def to_generate_request(chat: ChatCompletionRequest) -> inference_pb2.GenerateRequest:
    """The inference request for a validated chat request, with normalised text."""
    messages = [
        common_pb2.ChatMessage(
            role=m.role,
            content=normalize_text(chat.text_of(i)),
            name=m.name or "",
        )
        for i, m in enumerate(chat.messages)
    ]
    sampling = inference_pb2.SamplingParams(n=chat.n or 1)
    limit = chat.completion_limit()
    if limit is not None:
        sampling.max_tokens = limit
    if chat.temperature is not None:
        sampling.temperature = chat.temperature
    if chat.top_p is not None:
        sampling.top_p = chat.top_p
    if chat.seed is not None:
        sampling.seed = chat.seed
    if chat.presence_penalty is not None:
        sampling.presence_penalty = chat.presence_penalty
    if chat.frequency_penalty is not None:
        sampling.frequency_penalty = chat.frequency_penalty
    return inference_pb2.GenerateRequest(
        model=chat.model, chat=inference_pb2.ChatInput(messages=messages), sampling=sampling
    )


def to_process_start(chat: ChatCompletionRequest) -> postprocess_pb2.ProcessStart:
    return postprocess_pb2.ProcessStart(
        id=f"chatcmpl-{uuid.uuid4().hex}",
        model=chat.model,
        created=int(time.time()),
        stream=bool(chat.stream),
        include_usage=bool(chat.stream and chat.stream_options and chat.stream_options.include_usage),
        stop=chat.stop_list(),
        n=chat.n or 1,
        object=postprocess_pb2.OBJECT_KIND_CHAT_COMPLETION,
    )


class ChatCompletions:
    """The chat completions endpoint, bound to the mesh clients."""

    def __init__(self, clients: MeshClients, settings: PreprocessSettings) -> None:
        self._clients = clients
        self._settings = settings

    async def create(self, request: Request) -> Response:
        arrived = time.perf_counter()
        chat = parse_chat_request(await read_json(request, self._settings.max_body_bytes), self._settings.max_n)
        pipeline = GenerationPipeline(
            self._clients, to_generate_request(chat), to_process_start(chat), self._settings.request_timeout
        )
        stream = "true" if chat.stream else "false"
        try:
            await until_disconnect(request, pipeline.open())
            if chat.stream:
                return StreamingResponse(
                    self._events(pipeline, arrived), media_type="text/event-stream", headers=SSE_HEADERS
                )
            body = await until_disconnect(request, pipeline.collect())
        except RagmeshError as err:
            COMPLETIONS.labels(stream, err.kind.value).inc()
            raise
        COMPLETIONS.labels(stream, "ok").inc()
        return Response(body, media_type="application/json")

    async def _events(self, pipeline: GenerationPipeline, arrived: float) -> AsyncIterator[bytes]:
        # Starlette cancels this generator when the client disconnects; the
        # pipeline's cleanup then cancels the gRPC calls and frees the slot.
        first = True
        try:
            async for response in pipeline.responses():
                if response.chunk_json:
                    if first:
                        TTFT.observe(time.perf_counter() - arrived)
                        first = False
                    yield sse_event(response.chunk_json)
            yield SSE_DONE
            COMPLETIONS.labels("true", "ok").inc()
        except RagmeshError as err:
            # Headers are sent: the error travels as an event the openai client raises.
            log.warning("stream failed", extra={"kind": err.kind.value, "error": err.message})
            COMPLETIONS.labels("true", err.kind.value).inc()
            yield sse_error(err)

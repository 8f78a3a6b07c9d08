"""POST /v1/chat/completions: validate, normalise, run the pipeline, answer JSON or SSE."""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
from google.protobuf.json_format import MessageToDict
from prometheus_client import Counter, Histogram
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from preprocess.clients import MeshClients
from preprocess.http_io import SSE_DONE, read_json, sse_error, sse_event, until_disconnect
from preprocess.normalize import normalize_text
from preprocess.pipeline import Answer, CachedAnswer, GenerationPipeline
from preprocess.protocol import ChatCompletionRequest, parse_chat_request
from preprocess.rag import NO_SOURCES_ANSWER, RagPlanner, RagSpec, Retrieved
from preprocess.settings import ModelAlias, PreprocessSettings
from ragmesh.errors import RagmeshError
from ragmesh.v1 import common_pb2, inference_pb2, postprocess_pb2

log = logging.getLogger(__name__)

TTFT = Histogram(
    "ragmesh_preprocess_time_to_first_token_seconds",
    "Time from request arrival to the first content chunk sent (streaming)",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
COMPLETIONS = Counter("ragmesh_preprocess_chat_completions_total", "Chat completions by outcome", ["stream", "outcome"])

# Says whether the answer came from the response cache: hit, miss or off (not cacheable).
CACHE_HEADER = "X-Ragmesh-Cache"

SSE_HEADERS = {
    "Cache-Control": "no-cache",
    # Tells nginx not to buffer this response even if buffering is on for the location.
    "X-Accel-Buffering": "no",
}


def normalized_messages(chat: ChatCompletionRequest) -> list[common_pb2.ChatMessage]:
    """The conversation as the model gets it: content parts joined, text normalised."""
    return [
        common_pb2.ChatMessage(role=m.role, content=normalize_text(chat.text_of(i)), name=m.name or "")
        for i, m in enumerate(chat.messages)
    ]


def to_generate_request(
    chat: ChatCompletionRequest, model: str | None = None, messages: list[common_pb2.ChatMessage] | None = None
) -> inference_pb2.GenerateRequest:
    """The inference request for a validated chat request (its own messages unless RAG rewrote them)."""
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
    request = inference_pb2.GenerateRequest(
        model=model or chat.model,
        chat=inference_pb2.ChatInput(messages=messages if messages is not None else normalized_messages(chat)),
        sampling=sampling,
    )
    if chat.response_format is not None and chat.response_format.type != "text":
        request.response_format_json = orjson.dumps(
            chat.response_format.model_dump(by_alias=True, exclude_none=True)
        ).decode()
    return request


def to_process_start(chat: ChatCompletionRequest) -> postprocess_pb2.ProcessStart:
    start = postprocess_pb2.ProcessStart(
        id=f"chatcmpl-{uuid.uuid4().hex}",
        model=chat.model,
        created=int(time.time()),
        stream=bool(chat.stream),
        include_usage=bool(chat.stream and chat.stream_options and chat.stream_options.include_usage),
        stop=chat.stop_list(),
        n=chat.n or 1,
        object=postprocess_pb2.OBJECT_KIND_CHAT_COMPLETION,
    )
    fmt = chat.response_format
    if fmt is not None:
        start.response_format.type = fmt.type
        if fmt.json_schema is not None:
            start.response_format.schema_json = orjson.dumps(fmt.json_schema.schema_).decode()
    return start


def rag_spec(chat: ChatCompletionRequest, alias: ModelAlias | None) -> RagSpec | None:
    """The request's own `rag` field wins over the alias's binding."""
    if chat.rag is not None:
        return RagSpec(chat.rag.collection, chat.rag.top_k, chat.rag.mode, chat.rag.on_error)
    if alias is not None:
        return RagSpec(alias.collection, alias.top_k, alias.mode, alias.on_retrieval_error)
    return None


def cache_key(
    chat: ChatCompletionRequest,
    generate: inference_pb2.GenerateRequest,
    spec: RagSpec | None,
    retrieved: Retrieved | None,
) -> str:
    """What makes two requests the same answer: inputs, sampling and (RAG) the collection's version."""
    material: dict[str, Any] = {
        "v": 1,
        "model": chat.model,
        "engine_model": generate.model,
        "messages": [[m.role, m.name, normalize_text(chat.text_of(i))] for i, m in enumerate(chat.messages)],
        "sampling": MessageToDict(generate.sampling, preserving_proto_field_name=True),
        "stop": chat.stop_list(),
        "response_format": generate.response_format_json,
    }
    if spec is not None and retrieved is not None:
        material["rag"] = [
            spec.collection,
            spec.top_k,
            spec.mode,
            retrieved.collection_id,
            retrieved.report.index_version,
        ]
    return hashlib.sha256(orjson.dumps(material, option=orjson.OPT_SORT_KEYS)).hexdigest()


class ChatCompletions:
    """The chat completions endpoint, bound to the mesh clients."""

    def __init__(self, clients: MeshClients, settings: PreprocessSettings) -> None:
        self._clients = clients
        self._settings = settings
        self._rag = RagPlanner(clients, settings.rag_search_timeout, settings.rag_completion_reserve)

    def _cacheable(self, request: Request, chat: ChatCompletionRequest) -> bool:
        no_cache = "no-cache" in request.headers.get("cache-control", "").lower()
        return self._settings.response_cache and chat.cache is not False and not no_cache and chat.deterministic()

    async def create(self, request: Request) -> Response:
        arrived = time.perf_counter()
        chat = parse_chat_request(await read_json(request, self._settings.max_body_bytes), self._settings.max_n)
        stream = "true" if chat.stream else "false"
        try:
            answer, cache_state = await until_disconnect(request, self._answer(request, chat))
            headers = {CACHE_HEADER: cache_state}
            if chat.stream:
                return StreamingResponse(
                    self._events(answer, arrived), media_type="text/event-stream", headers={**SSE_HEADERS, **headers}
                )
            body = await until_disconnect(request, answer.collect())
        except RagmeshError as err:
            COMPLETIONS.labels(stream, err.kind.value).inc()
            raise
        COMPLETIONS.labels(stream, "ok").inc()
        return Response(body, media_type="application/json", headers=headers)

    async def _answer(self, request: Request, chat: ChatCompletionRequest) -> tuple[Answer, str]:
        """An opened answer (from the cache, or a generation under way) and the cache state."""
        alias = self._settings.model_aliases.get(chat.model)
        spec = rag_spec(chat, alias)
        model = alias.model if alias is not None else chat.model
        messages = normalized_messages(chat)
        start = to_process_start(chat)
        retrieved = await self._rag.retrieve(messages, spec) if spec is not None else None
        generate = to_generate_request(chat, model, messages)

        cache_state = "off"
        if self._cacheable(request, chat):
            start.cache_key = cache_key(chat, generate, spec, retrieved)
            if retrieved is not None:
                start.rag.CopyFrom(retrieved.report)
            cached = CachedAnswer(self._clients, start, self._settings.request_timeout)
            if await cached.open():
                return cached, "hit"
            cache_state = "miss"

        fixed = None
        if retrieved is not None:
            planned = await self._rag.fit(model, messages, retrieved, chat.completion_limit())
            generate.chat.ClearField("messages")
            generate.chat.messages.extend(planned.messages)
            start.rag.CopyFrom(planned.report)
            start.sources.extend(planned.sources)
            if planned.no_sources:
                fixed = common_pb2.GenerationChunk(
                    text=NO_SOURCES_ANSWER.format(collection=planned.report.collection),
                    finish_reason=common_pb2.FINISH_REASON_STOP,
                    model=model,
                )
        pipeline = GenerationPipeline(self._clients, generate, start, self._settings.request_timeout, fixed)
        await pipeline.open()
        return pipeline, cache_state

    async def _events(self, answer: Answer, arrived: float) -> AsyncIterator[bytes]:
        # Starlette cancels this generator when the client disconnects; the
        # answer's cleanup then cancels the gRPC calls and frees the slot.
        first = True
        try:
            async for response in answer.responses():
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

"""POST /v1/chat/completions and POST /v1/completions over HTTP: JSON or SSE, cancelled with the client."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from starlette.background import BackgroundTask
from starlette.responses import Response, StreamingResponse

from preprocess.api.deps import ApiKeyDep, ChatDep, json_body
from preprocess.api.http_io import until_disconnect
from preprocess.api.openapi import errors, event_stream, request_body
from preprocess.keys import ApiKey, check_model_allowed
from preprocess.metrics import RequestClock
from preprocess.pipeline import Answer
from preprocess.protocol import ChatCompletionRequest, CompletionRequest, SamplingRequest
from preprocess.serving.chat import ChatServing
from preprocess.serving.operations import CHAT, COMPLETIONS
from preprocess.serving.sse import SSE_HEADERS
from ragmesh.errors import RagmeshError

# Says whether the answer came from the response cache: hit, miss or off (not cacheable).
CACHE_HEADER = "X-Ragmesh-Cache"

router = APIRouter(tags=["chat"], responses=errors(400, 401, 404, 413, 415, 429, 502, 503, 504))


@router.post(
    CHAT.url,
    summary=CHAT.summary,
    response_model=CHAT.response,
    openapi_extra=request_body(CHAT.request),
    responses=event_stream("chat.completion.chunk events, then [DONE]"),
)
async def create_chat_completion(
    request: Annotated[ChatCompletionRequest, Depends(json_body(CHAT))],
    raw_request: Request,
    chat: ChatDep,
    key: ApiKeyDep,
) -> Response:
    return await respond(raw_request, chat, "chat", request, key)


@router.post(
    COMPLETIONS.url,
    summary=COMPLETIONS.summary,
    response_model=COMPLETIONS.response,
    openapi_extra=request_body(COMPLETIONS.request),
    responses=event_stream("text_completion events, then [DONE]"),
)
async def create_completion(
    request: Annotated[CompletionRequest, Depends(json_body(COMPLETIONS))],
    raw_request: Request,
    chat: ChatDep,
    key: ApiKeyDep,
) -> Response:
    return await respond(raw_request, chat, "completions", request, key)


async def _collected(opened: Awaitable[tuple[Answer, str]]) -> tuple[Answer, str, str]:
    """An opened answer, its cache state and its whole (non-streamed) body."""
    answer, cache_state = await opened
    return answer, cache_state, await answer.collect()


async def respond(
    raw_request: Request, chat: ChatServing, endpoint: str, req: SamplingRequest, key: ApiKey | None
) -> Response:
    """The answer as JSON or SSE; the generation is cancelled if the client leaves first."""
    clock = RequestClock(req.model, endpoint, bool(req.stream))
    check_model_allowed(key, req.model)
    # What the request may use is taken at admission: a client that leaves mid-answer has paid.
    reserved = await chat.reserve(key, req)
    try:
        no_cache = "no-cache" in raw_request.headers.get("cache-control", "").lower()
        opened = chat.answer(req, chat.cacheable(req, no_cache), key=key)
        if req.stream:
            answer, cache_state = await until_disconnect(raw_request, opened)
            return StreamingResponse(
                chat.events(answer, clock, key, reserved),
                media_type="text/event-stream",
                headers={**SSE_HEADERS, CACHE_HEADER: cache_state},
            )
        # One disconnect watch over opening and collecting: each costs two tasks.
        answer, cache_state, body = await until_disconnect(raw_request, _collected(opened))
    except RagmeshError as err:
        clock.finished(err.kind.value)
        await chat.charge(key, None, reserved)  # refused before generating: nothing used
        raise
    clock.finished("ok", answer.usage)
    # Charged once the response is out: the client does not wait for the bookkeeping.
    return Response(
        body,
        media_type="application/json",
        headers={CACHE_HEADER: cache_state},
        background=BackgroundTask(chat.charge, key, answer, reserved),
    )

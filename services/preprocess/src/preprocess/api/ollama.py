"""Ollama's API over HTTP: /api/chat, /api/generate, /api/embed, /api/embeddings, /api/tags, /api/show,
/api/ps, /api/version.

The routes read Ollama's bodies (any content type: Ollama's own examples send
JSON without one), run them through the same serving objects as the OpenAI
routes (`serving.ollama` turns one shape into the other), and answer JSON or
NDJSON. Errors are Ollama's `{"error": "..."}` with the error table's status
(`api.errors` renders every error under /api/ that way).
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.background import BackgroundTask
from starlette.responses import Response, StreamingResponse

from preprocess.api.deps import ApiKeyDep, ChatDep, ServingDep
from preprocess.api.http_io import read_raw, until_disconnect
from preprocess.api.openapi import ERROR_DESCRIPTIONS, request_body
from preprocess.api.responses import json_response
from preprocess.keys import ApiKey, check_model_allowed
from preprocess.metrics import RequestClock
from preprocess.protocol import SamplingRequest, validated
from preprocess.serving import ollama, ollama_answers
from preprocess.serving import ollama_schemas as schemas
from preprocess.serving.chat import ChatServing
from preprocess.serving.ollama_models import OllamaModels
from preprocess.serving.services import Serving
from ragmesh.errors import RagmeshError, invalid_request

NDJSON = "application/x-ndjson"
_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": schemas.OllamaError, "description": description}
    for status, description in ERROR_DESCRIPTIONS.items()
    if status in (400, 401, 404, 413, 429, 503, 504)
}
router = APIRouter(prefix="/api", tags=["ollama"], responses=_ERRORS)


def _ndjson(description: str) -> dict[int | str, dict[str, Any]]:
    return {200: {"content": {NDJSON: {"schema": {"type": "string", "description": description}}}}}


async def _body(request: Request, serving: Serving) -> Any:
    raw = await read_raw(request, serving.settings.max_body_bytes)
    if not raw:
        raise invalid_request("The request body is empty; send a JSON object.")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise invalid_request(f"invalid JSON body: {exc.msg} at position {exc.pos}", code="invalid_json") from None


async def _known(serving: Serving, key: ApiKey | None, body: Any) -> set[str] | None:
    """The served model names, looked up only for a name Ollama-style tagged `:latest`."""
    name = body.get("model") if isinstance(body, dict) else None
    if isinstance(name, str) and name.endswith(":latest"):
        return await OllamaModels(serving.models).names(key)
    return None


async def _answer(
    raw_request: Request,
    chat: ChatServing,
    endpoint: str,
    req: SamplingRequest,
    key: ApiKey | None,
    is_chat: bool,
) -> Response:
    """Run `req` as the OpenAI routes do (keys, cache, metrics, charge) and answer in Ollama's shape."""
    started = time.perf_counter()
    clock = RequestClock(req.model, endpoint, bool(req.stream))
    check_model_allowed(key, req.model)
    # As on the OpenAI routes: tokens reserved at admission, the tenant in the cache key and the
    # collection access of an alias checked.
    reserved = await chat.reserve(key, req)
    try:
        no_cache = "no-cache" in raw_request.headers.get("cache-control", "").lower()
        opened = chat.answer(req, chat.cacheable(req, no_cache), key=key)
        if req.stream:
            answer, _ = await until_disconnect(raw_request, opened)
            return StreamingResponse(
                _stream(chat.chunks(answer, clock, key, reserved), req.model, is_chat, started),
                media_type=NDJSON,
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )

        async def collected() -> tuple[Any, str]:
            answer, _ = await opened
            return answer, await answer.collect()

        answer, body = await until_disconnect(raw_request, collected())
    except RagmeshError as err:
        clock.finished(err.kind.value)
        await chat.charge(key, None, reserved)  # refused before generating: nothing used
        raise
    clock.finished("ok", answer.usage)
    openai = orjson.loads(body)
    shaped = (
        ollama_answers.chat_body(openai, req.model, started)
        if is_chat
        else ollama_answers.generate_body(openai, req.model, started)
    )
    return Response(
        orjson.dumps(shaped),
        media_type="application/json",
        background=BackgroundTask(chat.charge, key, answer, reserved),
    )


async def _stream(chunks: Any, model: str, is_chat: bool, started: float) -> Any:
    """NDJSON lines; a failure after the first line is Ollama's error line (the client raises it)."""
    lines = ollama_answers.ndjson_lines(chunks, model, is_chat, started)
    try:
        async for line in lines:
            yield line
    except RagmeshError as err:
        yield ollama_answers.error_line(err)
    finally:
        await lines.aclose()


@router.post(
    "/chat",
    summary="Ollama chat: NDJSON stream by default, one JSON object with stream: false.",
    response_model=schemas.OllamaChatResponse,
    openapi_extra=request_body(ollama.OllamaChatRequest),
    responses=_ndjson("message lines, then a done line with the counts"),
)
async def chat(raw_request: Request, serving: ServingDep, chat: ChatDep, key: ApiKeyDep) -> Response:
    body = await _body(raw_request, serving)
    req = ollama.chat_request(body, serving.settings, await _known(serving, key, body))
    return await _answer(raw_request, chat, "ollama_chat", req, key, is_chat=True)


@router.post(
    "/generate",
    summary="Ollama generate: a prompt (the chat template applies unless raw).",
    response_model=schemas.OllamaGenerateResponse,
    openapi_extra=request_body(ollama.OllamaGenerateRequest),
    responses=_ndjson("response lines, then a done line with the counts"),
)
async def generate(raw_request: Request, serving: ServingDep, chat: ChatDep, key: ApiKeyDep) -> Response:
    body = await _body(raw_request, serving)
    asked, req = ollama.generate_request(body, serving.settings, await _known(serving, key, body))
    if req is None:
        # An empty prompt loads the model in Ollama; the mesh's are loaded: say so, if it exists.
        model = ollama.model_name(asked.model, await OllamaModels(serving.models).names(key))
        await OllamaModels(serving.models).show(model, key)
        return json_response(ollama_answers.loaded_body(asked.model))
    return await _answer(raw_request, chat, "ollama_generate", req, key, is_chat=False)


@router.post(
    "/embed",
    summary="Ollama embed: embeddings of one text or a list.",
    response_model=schemas.OllamaEmbedResponse,
    openapi_extra=request_body(ollama.OllamaEmbedRequest),
)
async def embed(raw_request: Request, serving: ServingDep, key: ApiKeyDep) -> Response:
    started = time.perf_counter()
    req = ollama.embed_request(await _body(raw_request, serving))
    check_model_allowed(key, req.model)
    out = await serving.embeddings.create(req)
    return json_response(
        {
            "model": req.model,
            "embeddings": [item["embedding"] for item in out["data"]],
            "total_duration": int((time.perf_counter() - started) * 1e9),
            "load_duration": 0,
            "prompt_eval_count": out["usage"]["prompt_tokens"],
        }
    )


@router.post(
    "/embeddings",
    summary="Ollama's older embeddings endpoint: one prompt, one embedding.",
    response_model=schemas.OllamaEmbeddingResponse,
    openapi_extra=request_body(ollama.OllamaEmbeddingsRequest),
)
async def embeddings(raw_request: Request, serving: ServingDep, key: ApiKeyDep) -> Response:
    req = ollama.embeddings_request(await _body(raw_request, serving))
    check_model_allowed(key, req.model)
    out = await serving.embeddings.create(req)
    return json_response({"embedding": out["data"][0]["embedding"]})


@router.get("/tags", summary="Ollama's model list: every model the mesh serves.", response_model=schemas.OllamaTags)
async def tags(serving: ServingDep, key: ApiKeyDep) -> Response:
    return json_response(await OllamaModels(serving.models).tags(key))


@router.get(
    "/ps",
    summary="Ollama's running models: the embedded ones, loaded while the mesh runs.",
    response_model=schemas.OllamaRunning,
)
async def running(serving: ServingDep, key: ApiKeyDep) -> Response:
    return json_response(await OllamaModels(serving.models).running(key))


@router.post(
    "/show",
    summary="Ollama's model card: details, context length, capabilities.",
    response_model=schemas.OllamaShowResponse,
    openapi_extra=request_body(ollama.OllamaShowRequest),
)
async def show(raw_request: Request, serving: ServingDep, key: ApiKeyDep) -> Response:
    body = await _body(raw_request, serving)
    asked = validated(ollama.OllamaShowRequest, body).model_name()
    models = OllamaModels(serving.models)
    name = ollama.model_name(asked, await models.names(key) if asked.endswith(":latest") else None)
    return json_response(await models.show(name, key))


@router.get("/version", summary="The Ollama API version the gateway follows.", response_model=schemas.OllamaVersion)
async def version() -> Response:
    return json_response({"version": ollama.OLLAMA_VERSION})

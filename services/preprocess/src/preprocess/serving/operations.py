"""THE table of operations: a URL, the request model it takes, the handler that answers it.

One row per endpoint that runs a request through the mesh. The HTTP routes
(`preprocess.api`) take their path, request model and response model from
here; batch files are checked against it (`BATCH_URLS`); and the batch
workers run each line, and each request of the direct queue protocol, through
`OperationRunner`: `await runner(url, body)`, the same validation and the
same handler as over HTTP (at batch priority, never streamed). A new endpoint
that batches may call is one row here.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

from preprocess.keys import ApiKey, check_model_allowed
from preprocess.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingsRequest,
    parse_chat_request,
    parse_completion_request,
    validated,
)
from preprocess.serving import schemas
from preprocess.serving.services import Serving
from preprocess.settings import PreprocessSettings
from ragmesh.errors import ErrorKind, RagmeshError, invalid_request

Req = TypeVar("Req", bound=BaseModel)


@dataclass(frozen=True)
class Operation(Generic[Req]):
    url: str
    summary: str
    request: type[Req]
    response: type[BaseModel]
    # A decoded JSON body as the validated request (400 naming the parameter).
    parse: Callable[[Any, PreprocessSettings], Req]
    # The whole (non-streamed) answer at batch priority: what a batch line gets (checked against
    # the key's models and charged to it, when the line has one).
    run: Callable[[Serving, Req, ApiKey | None], Awaitable[dict[str, Any]]]
    # Takes an engine slot: batch workers run fewer of these at once.
    generates: bool


CHAT = Operation(
    url="/v1/chat/completions",
    summary="Chat completion (streamed with `stream: true`; RAG with `rag` or a model alias).",
    request=ChatCompletionRequest,
    response=schemas.ChatCompletionResponse,
    parse=lambda body, settings: parse_chat_request(
        body, settings.max_n, settings.max_data_url_bytes, settings.request_bounds()
    ),
    run=lambda serving, request, key: serving.chat.complete(request, key),
    generates=True,
)
EMBEDDINGS = Operation(
    url="/v1/embeddings",
    summary="Embeddings of one text or a list of texts.",
    request=EmbeddingsRequest,
    response=schemas.EmbeddingsResponse,
    parse=lambda body, settings: validated(EmbeddingsRequest, body),
    run=lambda serving, request, key: _embed(serving, request, key),
    generates=False,
)
COMPLETIONS = Operation(
    url="/v1/completions",
    summary="Legacy text completion, one prompt per request.",
    request=CompletionRequest,
    response=schemas.CompletionResponse,
    parse=lambda body, settings: parse_completion_request(body, settings.max_n, bounds=settings.request_bounds()),
    run=lambda serving, request, key: serving.chat.complete(request, key),
    generates=True,
)


async def _embed(serving: Serving, request: EmbeddingsRequest, key: ApiKey | None) -> dict[str, Any]:
    check_model_allowed(key, request.model)
    return await serving.embeddings.create(request)


OPERATIONS: dict[str, Operation[Any]] = {op.url: op for op in (CHAT, EMBEDDINGS, COMPLETIONS)}
# What a batch line's `url` (and a batch's `endpoint`) may be.
BATCH_URLS = tuple(OPERATIONS)


def operation(url: str) -> Operation[Any]:
    """The row of `url`; 400 naming the url when there is none."""
    found = OPERATIONS.get(url)
    if found is None:
        raise invalid_request(f"url must be one of {', '.join(BATCH_URLS)}.", param="url")
    return found


def generates(url: str) -> bool:
    """Whether a request to `url` takes an engine slot."""
    found = OPERATIONS.get(url)
    return found is not None and found.generates


class OperationRunner:
    """Runs one request (url, JSON body) through the mesh, as a batch line: the response body or a RagmeshError."""

    def __init__(self, serving: Serving) -> None:
        self._serving = serving

    async def __call__(self, url: str, body: dict[str, Any], owner: str | None = None) -> dict[str, Any]:
        """`owner`: the id of the key the request runs for (None: auth off); an owner whose key is
        gone or revoked gets a 401."""
        op = operation(url)
        key = await self._key(owner)
        return await op.run(self._serving, op.parse(body, self._serving.settings), key)

    async def _key(self, owner: str | None) -> ApiKey | None:
        if owner is None:
            return None
        key = await self._serving.keys.get(owner)
        if key is None or key.revoked:
            raise RagmeshError(ErrorKind.AUTHENTICATION, "The batch's API key was revoked.", code="invalid_api_key")
        return key

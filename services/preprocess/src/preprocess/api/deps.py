"""What routes need, as typed `Annotated` dependencies.

The serving objects are built once in the app's lifespan and kept on
`app.state`; this module is the one place that reads them from there, so a
route names what it needs (`chat: ChatDep`) and gets it typed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request
from pydantic import BaseModel

from preprocess.api.auth import api_key_of
from preprocess.api.http_io import read_json
from preprocess.batches import Batches
from preprocess.keys import ApiKey
from preprocess.protocol import validated
from preprocess.serving.admin import AdminServing, audited, check_admin
from preprocess.serving.chat import ChatServing
from preprocess.serving.embeddings import EmbeddingsServing
from preprocess.serving.forward import ForwardServing
from preprocess.serving.models import ModelsServing
from preprocess.serving.operations import Operation
from preprocess.serving.rerank import RerankServing
from preprocess.serving.retrieval import RetrievalServing
from preprocess.serving.services import Serving
from preprocess.settings import PreprocessSettings
from ragmesh.errors import ErrorKind, RagmeshError

Req = TypeVar("Req", bound=BaseModel)


# The dependencies below are `async def` although they never wait: FastAPI runs a plain
# `def` dependency in its thread pool, a thread hop per dependency per request on the
# hot path (seen with py-spy under load, bench/gateway_overhead.py).


def _starting() -> RagmeshError:
    return RagmeshError(ErrorKind.UNAVAILABLE, "The service is starting; retry shortly.", retry_after=1)


async def get_serving(request: Request) -> Serving:
    serving = getattr(request.app.state, "serving", None)
    if not isinstance(serving, Serving):
        raise _starting()
    return serving


async def get_batches(request: Request) -> Batches:
    batches = getattr(request.app.state, "batches", None)
    if not isinstance(batches, Batches):
        raise _starting()
    return batches


ServingDep = Annotated[Serving, Depends(get_serving)]
BatchesDep = Annotated[Batches, Depends(get_batches)]


async def _settings(serving: ServingDep) -> PreprocessSettings:
    return serving.settings


async def _chat(serving: ServingDep) -> ChatServing:
    return serving.chat


async def _embeddings(serving: ServingDep) -> EmbeddingsServing:
    return serving.embeddings


async def _retrieval(serving: ServingDep) -> RetrievalServing:
    return serving.retrieval


async def _models(serving: ServingDep) -> ModelsServing:
    return serving.models


async def _admin(serving: ServingDep) -> AdminServing:
    return serving.admin


async def _forward(serving: ServingDep) -> ForwardServing:
    return serving.forward


async def _rerank(serving: ServingDep) -> RerankServing:
    return serving.rerank


async def _api_key(request: Request) -> ApiKey | None:
    return api_key_of(request)


SettingsDep = Annotated[PreprocessSettings, Depends(_settings)]
ChatDep = Annotated[ChatServing, Depends(_chat)]
EmbeddingsDep = Annotated[EmbeddingsServing, Depends(_embeddings)]
RetrievalDep = Annotated[RetrievalServing, Depends(_retrieval)]
ModelsDep = Annotated[ModelsServing, Depends(_models)]
AdminDep = Annotated[AdminServing, Depends(_admin)]
ForwardDep = Annotated[ForwardServing, Depends(_forward)]
RerankDep = Annotated[RerankServing, Depends(_rerank)]
# The key that authenticated the request (None with auth off).
ApiKeyDep = Annotated[ApiKey | None, Depends(_api_key)]


async def _owner(key: ApiKeyDep) -> str | None:
    return key.id if key is not None else None


# Whose files and batches a request may see: its key's id (None with auth off: everyone's).
OwnerDep = Annotated[str | None, Depends(_owner)]


async def require_admin(request: Request, settings: SettingsDep) -> None:
    """Admin routes: the admin key as a bearer token (401 otherwise; 404 when the admin API is off)."""
    async with audited("admin.authenticate", f"{request.method} {request.url.path}"):
        check_admin(request.headers.get("authorization"), settings.admin_key)


def json_body(
    parse: Operation[Req] | Callable[[Any, PreprocessSettings], Req],
) -> Callable[[Request, PreprocessSettings], Awaitable[Req]]:
    """A dependency that reads the JSON body (415/413/400 as OpenAI would) and validates it.

    Validation is ragmesh's own (400 naming the parameter, never FastAPI's 422);
    the route documents the body with `openapi.request_body`.
    """
    validate = parse.parse if isinstance(parse, Operation) else parse

    async def dependency(request: Request, settings: SettingsDep) -> Req:
        return validate(await read_json(request, settings.max_body_bytes), settings)

    return dependency


def model_body(model: type[Req]) -> Callable[[Request, PreprocessSettings], Awaitable[Req]]:
    """`json_body` for a request model with no checks beyond its own."""
    return json_body(lambda body, settings: validated(model, body))

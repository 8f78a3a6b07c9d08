"""GET /v1/models and /v1/models/{model}: the model cards inference serves, in OpenAI shape."""

from __future__ import annotations

import asyncio
import hmac
from typing import Any

import grpc
from starlette.requests import Request

from preprocess.clients import MeshClients
from preprocess.settings import ModelAlias
from ragmesh.errors import ErrorKind, RagmeshError, from_rpc_error
from ragmesh.grpc_client import call_metadata
from ragmesh.v1 import common_pb2, inference_pb2


def model_object(card: common_pb2.ModelCard) -> dict[str, Any]:
    """OpenAI's model object plus vLLM's max_model_len and, where known, what the model does."""
    body: dict[str, Any] = {
        "id": card.id,
        "object": "model",
        "created": card.created,
        "owned_by": card.owned_by,
        "max_model_len": card.max_context,
    }
    if card.capabilities:
        body["capabilities"] = list(card.capabilities)
    return body


async def list_models(clients: MeshClients, deadline: float = 10.0) -> list[common_pb2.ModelCard]:
    """Chat and upstream reranking models from inference, then embedding and local reranking models
    from retrieval (left out if it is down)."""
    request = common_pb2.ListModelsRequest()
    chat, embedding = await asyncio.gather(
        clients.inference.ListModels(request, timeout=deadline, metadata=call_metadata()),
        clients.retrieval.ListModels(request, timeout=deadline, metadata=call_metadata()),
        return_exceptions=True,
    )
    if isinstance(chat, grpc.aio.AioRpcError):
        raise from_rpc_error(chat) from None
    if isinstance(chat, BaseException):
        raise chat
    models = list(chat.models)
    if isinstance(embedding, common_pb2.ListModelsResponse):
        models.extend(embedding.models)
    return models


def alias_object(name: str, alias: ModelAlias, base: dict[str, Any]) -> dict[str, Any]:
    """A model alias's card: its base model (vLLM's root/parent) and the collection it answers from."""
    return {
        **base,
        "id": name,
        "root": alias.model,
        "parent": alias.model,
        "rag": {"collection": alias.collection, "top_k": alias.top_k, "mode": alias.mode},
    }


async def all_models(clients: MeshClients, aliases: dict[str, ModelAlias]) -> list[dict[str, Any]]:
    """Served models, then the aliases whose base model is served."""
    models = [model_object(card) for card in await list_models(clients)]
    by_id = {m["id"]: m for m in models}
    models += [alias_object(name, a, by_id[a.model]) for name, a in sorted(aliases.items()) if a.model in by_id]
    return models


async def models_page(clients: MeshClients, aliases: dict[str, ModelAlias]) -> dict[str, Any]:
    return {"object": "list", "data": await all_models(clients, aliases)}


async def model_detail(clients: MeshClients, aliases: dict[str, ModelAlias], model: str) -> dict[str, Any]:
    for card in await all_models(clients, aliases):
        if card["id"] == model:
            return card
    raise RagmeshError(
        ErrorKind.NOT_FOUND, f"The model `{model}` does not exist.", param="model", code="model_not_found"
    )


def check_admin(request: Request, admin_key: str) -> None:
    """Admin endpoints need the configured admin key as a bearer token (and are off without one)."""
    if not admin_key:
        raise RagmeshError(ErrorKind.NOT_FOUND, "Admin endpoints are off (RAGMESH_PREPROCESS_ADMIN_KEY is not set).")
    given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
    if not hmac.compare_digest(given.encode(), admin_key.encode()):
        raise RagmeshError(ErrorKind.AUTHENTICATION, "A valid admin key is required.")


async def reload_inference_backends(clients: MeshClients) -> dict[str, Any]:
    """Ask inference to read its backends file again (a bad file is refused, naming the line)."""
    try:
        reply = await clients.inference.ReloadBackends(
            inference_pb2.ReloadBackendsRequest(), timeout=60, metadata=call_metadata()
        )
    except grpc.aio.AioRpcError as exc:
        raise from_rpc_error(exc) from None
    return {"object": "backends.reloaded", "backends": list(reply.backends), "models": list(reply.models)}

"""GET /v1/models and /v1/models/{model}: the model cards inference serves, in OpenAI shape."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from preprocess.clients import MeshClients
from preprocess.keys import ApiKey, check_model_allowed
from preprocess.settings import ModelAlias
from ragmesh.errors import ErrorKind, RagmeshError, from_rpc_error
from ragmesh.grpc_client import call_metadata
from ragmesh.v1 import common_pb2


def model_object(card: common_pb2.ModelCard) -> dict[str, Any]:
    """OpenAI's model object, vLLM's max_model_len, and what the model does and where it runs."""
    return {
        "id": card.id,
        "object": "model",
        "created": card.created,
        "owned_by": card.owned_by,
        "max_model_len": card.max_context,
        "capabilities": list(card.capabilities),
        "backend_type": card.backend_type or "embedded",
    }


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


class ModelsServing:
    """GET /v1/models and /v1/models/{model}: what a key may use, as OpenAI's model objects."""

    def __init__(self, clients: MeshClients, aliases: dict[str, ModelAlias]) -> None:
        self._clients = clients
        self._aliases = aliases

    async def page(self, key: ApiKey | None) -> dict[str, Any]:
        """The model list; a key limited to some models sees only those."""
        models = await all_models(self._clients, self._aliases)
        if key is not None and key.models:
            models = [card for card in models if card["id"] in key.models]
        return {"object": "list", "data": models}

    async def detail(self, model: str, key: ApiKey | None) -> dict[str, Any]:
        check_model_allowed(key, model)
        for card in await all_models(self._clients, self._aliases):
            if card["id"] == model:
                return card
        raise RagmeshError(
            ErrorKind.NOT_FOUND, f"The model `{model}` does not exist.", param="model", code="model_not_found"
        )

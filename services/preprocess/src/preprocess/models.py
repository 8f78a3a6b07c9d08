"""GET /v1/models and /v1/models/{model}: the model cards inference serves, in OpenAI shape."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from preprocess.clients import MeshClients
from ragmesh.errors import ErrorKind, RagmeshError, from_rpc_error
from ragmesh.grpc_client import call_metadata
from ragmesh.v1 import common_pb2


def model_object(card: common_pb2.ModelCard) -> dict[str, Any]:
    """OpenAI's model object plus vLLM's max_model_len."""
    return {
        "id": card.id,
        "object": "model",
        "created": card.created,
        "owned_by": card.owned_by,
        "max_model_len": card.max_context,
    }


async def list_models(clients: MeshClients, deadline: float = 10.0) -> list[common_pb2.ModelCard]:
    """Chat models from inference, then embedding models from retrieval (left out if it is down)."""
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


async def models_page(clients: MeshClients) -> dict[str, Any]:
    return {"object": "list", "data": [model_object(card) for card in await list_models(clients)]}


async def model_detail(clients: MeshClients, model: str) -> dict[str, Any]:
    for card in await list_models(clients):
        if card.id == model:
            return model_object(card)
    raise RagmeshError(
        ErrorKind.NOT_FOUND, f"The model `{model}` does not exist.", param="model", code="model_not_found"
    )

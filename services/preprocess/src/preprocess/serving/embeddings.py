"""POST /v1/embeddings, routed by model like chat.

The mesh's own model (retrieval's) honours NVIDIA's `truncate` (NONE: a 400
past its limit; START/END: cut) and accepts `input_type` (it is symmetric);
any other model goes to the upstream that serves it, with the request as the
client sent it (input_type, truncate, encoding_format, dimensions and all).
"""

from __future__ import annotations

import array
import base64
import sys
import time
from typing import Any

import grpc

from preprocess.clients import MeshClients
from preprocess.protocol import EmbeddingsRequest
from preprocess.serving.forward import ForwardServing
from preprocess.settings import PreprocessSettings
from ragmesh.errors import RagmeshError, from_rpc_error, invalid_request
from ragmesh.grpc_client import call_metadata
from ragmesh.v1 import common_pb2, retrieval_pb2

# How long the mesh's own embedding model ids are trusted before asking retrieval again.
LOCAL_MODELS_TTL = 30.0


class EmbeddingsServing:
    def __init__(self, clients: MeshClients, settings: PreprocessSettings, forward: ForwardServing) -> None:
        self._clients = clients
        self._settings = settings
        self._forward = forward
        self._local: tuple[float, frozenset[str]] = (0.0, frozenset())

    async def _local_models(self) -> frozenset[str]:
        at, models = self._local
        if models and time.monotonic() - at < LOCAL_MODELS_TTL:
            return models
        try:
            reply = await self._clients.retrieval.ListModels(
                common_pb2.ListModelsRequest(), timeout=self._settings.retrieval_timeout, metadata=call_metadata()
            )
        except grpc.aio.AioRpcError as exc:
            if models:
                return models  # retrieval away for a moment: the last answer is still right
            raise from_rpc_error(exc) from None
        embedding = frozenset(card.id for card in reply.models if "embedding" in card.capabilities)
        self._local = (time.monotonic(), embedding)
        return self._local[1]

    async def create(self, request: EmbeddingsRequest) -> dict[str, Any]:
        """OpenAI's embeddings list for a validated request, from the model's own backend."""
        # No model: the mesh's own (as before there were upstream embedding models).
        local = await self._local_models()
        if request.model and request.model not in local:
            sent = request.model_dump(mode="json", exclude_unset=True, by_alias=True)
            try:
                return await self._forward.json("/embeddings", request.model, sent)
            except RagmeshError as err:
                if err.code != "unknown_url":
                    raise
                # A model the mesh serves itself that does not embed (the chat model, say), as vLLM answers.
                raise invalid_request(
                    f"The model `{request.model}` is not an embedding model; the mesh's own is "
                    f"{', '.join(sorted(local))} (GET /v1/models shows every model's capabilities).",
                    param="model",
                    code="model_not_supported",
                ) from None
        inputs = [request.input] if isinstance(request.input, str) else request.input
        if not inputs:
            raise invalid_request("'input' must not be empty.", param="input")
        if not all(isinstance(item, str) for item in inputs):
            raise invalid_request("Token arrays are not supported as 'input'; send text.", param="input")
        if request.dimensions is not None:
            raise invalid_request("'dimensions' is not supported by this model.", param="dimensions")
        try:
            reply = await self._clients.retrieval.Embed(
                retrieval_pb2.EmbedRequest(
                    model=request.model,
                    inputs=[str(item) for item in inputs],
                    truncate=request.truncate or "NONE",
                    input_type=request.input_type or "",
                ),
                timeout=self._settings.retrieval_timeout,
                metadata=call_metadata(),
            )
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        # Little-endian float32 rows, as OpenAI's base64 encoding is too: sliced, not decoded, for base64.
        row = 4 * reply.dimensions
        data = []
        for i in range(len(inputs)):
            raw = reply.vectors[i * row : (i + 1) * row]
            embedding: Any = base64.b64encode(raw).decode() if request.encoding_format == "base64" else _floats(raw)
            data.append({"object": "embedding", "index": i, "embedding": embedding})
        return {
            "object": "list",
            "data": data,
            "model": reply.model,
            "usage": {"prompt_tokens": reply.prompt_tokens, "total_tokens": reply.prompt_tokens},
        }


def _floats(raw: bytes) -> list[float]:
    values = array.array("f", raw)
    if sys.byteorder == "big":
        values.byteswap()
    return values.tolist()

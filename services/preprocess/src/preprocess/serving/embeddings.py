"""POST /v1/embeddings: vectors from the retrieval service's embedding model, in OpenAI's shape."""

from __future__ import annotations

import array
import base64
import sys
from typing import Any

import grpc

from preprocess.clients import MeshClients
from preprocess.protocol import EmbeddingsRequest
from preprocess.settings import PreprocessSettings
from ragmesh.errors import from_rpc_error, invalid_request
from ragmesh.grpc_client import call_metadata
from ragmesh.v1 import retrieval_pb2


class EmbeddingsServing:
    def __init__(self, clients: MeshClients, settings: PreprocessSettings) -> None:
        self._clients = clients
        self._settings = settings

    async def create(self, request: EmbeddingsRequest) -> dict[str, Any]:
        """OpenAI's embeddings list for a validated request."""
        inputs = [request.input] if isinstance(request.input, str) else request.input
        if not inputs:
            raise invalid_request("'input' must not be empty.", param="input")
        if not all(isinstance(item, str) for item in inputs):
            raise invalid_request("Token arrays are not supported as 'input'; send text.", param="input")
        if request.dimensions is not None:
            raise invalid_request("'dimensions' is not supported by this model.", param="dimensions")
        try:
            reply = await self._clients.retrieval.Embed(
                retrieval_pb2.EmbedRequest(model=request.model, inputs=[str(item) for item in inputs]),
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

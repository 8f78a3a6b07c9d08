"""The Inference gRPC servicer: a thin layer from the contract to the engine."""

from __future__ import annotations

from collections.abc import AsyncIterator

from inference.engine import LlamaCppEngine
from ragmesh.grpc_server import ServicerContext
from ragmesh.v1 import common_pb2, inference_pb2, inference_pb2_grpc


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    """Serves the embedded engine. Domain errors become statuses in the shared interceptor."""

    def __init__(self, engine: LlamaCppEngine) -> None:
        self._engine = engine

    async def Generate(  # noqa: N802 - gRPC method name
        self, request: inference_pb2.GenerateRequest, context: ServicerContext
    ) -> AsyncIterator[common_pb2.GenerationChunk]:
        stream = self._engine.generate(request)
        try:
            async for chunk in stream:
                yield chunk
        finally:
            # Runs on client cancellation too: closing the stream stops the engine.
            await stream.aclose()

    async def Tokenize(  # noqa: N802
        self, request: inference_pb2.TokenizeRequest, context: ServicerContext
    ) -> inference_pb2.TokenizeResponse:
        self._engine.check_model(request.model)
        ids = await self._engine.count_tokens(request)
        return inference_pb2.TokenizeResponse(
            count=len(ids),
            ids=ids if request.return_ids else [],
            max_context=self._engine.max_context,
        )

    async def ListModels(  # noqa: N802
        self, request: common_pb2.ListModelsRequest, context: ServicerContext
    ) -> common_pb2.ListModelsResponse:
        return common_pb2.ListModelsResponse(models=[self._engine.model_card()])

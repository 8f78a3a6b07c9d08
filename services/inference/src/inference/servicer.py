"""The Inference gRPC servicer: a thin layer from the contract to the router and engines."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

from inference.engine import LlamaCppEngine
from inference.router import Registry, Router
from ragmesh.errors import ErrorKind, RagmeshError, invalid_request
from ragmesh.grpc_server import ServicerContext
from ragmesh.v1 import common_pb2, inference_pb2, inference_pb2_grpc

# Characters per token when no tokenizer of the model is at hand (an upstream
# model and no embedded engine): a common rule of thumb for English text.
CHARS_PER_TOKEN = 4


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    """Domain errors become statuses in the shared interceptor."""

    def __init__(
        self, router: Router, embedded: LlamaCppEngine | None, reload: Callable[[], Awaitable[Registry]]
    ) -> None:
        self._router = router
        self._embedded = embedded
        self._reload = reload

    async def Generate(  # noqa: N802 - gRPC method name
        self, request: inference_pb2.GenerateRequest, context: ServicerContext
    ) -> AsyncIterator[common_pb2.GenerationChunk]:
        stream = self._router.generate(request)
        try:
            async for chunk in stream:
                yield chunk
        finally:
            # Runs on client cancellation too: closing the stream stops the engine.
            await stream.aclose()

    async def Tokenize(  # noqa: N802
        self, request: inference_pb2.TokenizeRequest, context: ServicerContext
    ) -> inference_pb2.TokenizeResponse:
        """Exact for the embedded model; for an upstream model, an estimate (its tokenizer is not here)."""
        card = self._card(request.model)
        ids = await self._embedded.count_tokens(request) if self._embedded is not None else []
        count = len(ids) if self._embedded is not None else _estimate(request)
        exact = self._embedded is not None and card.backend == "embedded"
        pieces: list[str] = []
        if request.return_pieces and exact and self._embedded is not None:
            pieces = await self._embedded.token_pieces(request)
        return inference_pb2.TokenizeResponse(
            count=count, ids=ids if request.return_ids and exact else [], max_context=card.max_context, pieces=pieces
        )

    async def TokenizeBatch(  # noqa: N802
        self, request: inference_pb2.TokenizeBatchRequest, context: ServicerContext
    ) -> inference_pb2.TokenizeBatchResponse:
        """Each input counted as Tokenize counts it, all in one call."""
        card = self._card(request.model)
        if self._embedded is not None:
            counts = [len(ids) for ids in await self._embedded.count_many(list(request.inputs))]
        else:
            counts = [_estimate(i) for i in request.inputs]
        return inference_pb2.TokenizeBatchResponse(counts=counts, max_context=card.max_context)

    def _card(self, model: str) -> common_pb2.ModelCard:
        card = self._router.card(model)
        if card is None:
            raise RagmeshError(
                ErrorKind.NOT_FOUND,
                f"The model `{model}` does not exist.",
                param="model",
                code="model_not_found",
            )
        return card

    async def ListModels(  # noqa: N802
        self, request: common_pb2.ListModelsRequest, context: ServicerContext
    ) -> common_pb2.ListModelsResponse:
        return common_pb2.ListModelsResponse(models=self._router.cards())

    async def Rerank(  # noqa: N802
        self, request: common_pb2.RerankRequest, context: ServicerContext
    ) -> common_pb2.RerankResponse:
        if not request.documents:
            raise invalid_request("documents must not be empty.", param="documents")
        return await self._router.rerank(request)

    async def Forward(  # noqa: N802
        self, request: inference_pb2.ForwardRequest, context: ServicerContext
    ) -> AsyncIterator[inference_pb2.ForwardChunk]:
        stream = self._router.forward(request)
        try:
            async for status, headers, data in stream:
                yield inference_pb2.ForwardChunk(status=status, headers=headers, data=data)
        finally:
            await stream.aclose()

    async def ListBackends(  # noqa: N802
        self, request: inference_pb2.ListBackendsRequest, context: ServicerContext
    ) -> inference_pb2.ListBackendsResponse:
        return inference_pb2.ListBackendsResponse(backends=self._router.backends())

    async def SetBackendKey(  # noqa: N802
        self, request: inference_pb2.SetBackendKeyRequest, context: ServicerContext
    ) -> inference_pb2.BackendInfo:
        return self._router.set_key(request.backend, request.api_key)

    async def RevertBackendKey(  # noqa: N802
        self, request: inference_pb2.RevertBackendKeyRequest, context: ServicerContext
    ) -> inference_pb2.BackendInfo:
        return self._router.revert_key(request.backend)

    async def ReloadBackends(  # noqa: N802
        self, request: inference_pb2.ReloadBackendsRequest, context: ServicerContext
    ) -> inference_pb2.ReloadBackendsResponse:
        registry = await self._reload()
        return inference_pb2.ReloadBackendsResponse(backends=list(registry.engines), models=sorted(registry.targets))


def _estimate(request: inference_pb2.TokenizeRequest | inference_pb2.TokenizeInput) -> int:
    """Tokens of a prompt without the model's tokenizer: characters / CHARS_PER_TOKEN, plus the template's."""
    text = request.prompt or "".join(m.content for m in request.chat.messages)
    return len(text) // CHARS_PER_TOKEN + 8 * len(request.chat.messages)

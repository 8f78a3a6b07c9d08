"""The Retrieval gRPC servicer: collections, search and embeddings."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from google.protobuf.struct_pb2 import Struct

from ragmesh.errors import ErrorKind, RagmeshError, invalid_request
from ragmesh.grpc_server import ServicerContext
from ragmesh.rerank import ranked
from ragmesh.v1 import common_pb2, ingest_pb2, retrieval_pb2, retrieval_pb2_grpc
from retrieval.catchup import export_parts
from retrieval.embedder import Embedder
from retrieval.index import Snapshot
from retrieval.ingestion import Ingestion
from retrieval.rerankers import Rerankers
from retrieval.search import Searcher
from retrieval.settings import RetrievalSettings
from retrieval.store import CollectionStore

log = logging.getLogger(__name__)

# Embed requests larger than this go to the bulk lane, leaving the interactive one to queries.
INTERACTIVE_EMBED_INPUTS = 16

MODE_NAMES = {
    retrieval_pb2.SEARCH_MODE_UNSPECIFIED: "hybrid",  # the default
    retrieval_pb2.SEARCH_MODE_HYBRID: "hybrid",
    retrieval_pb2.SEARCH_MODE_DENSE: "dense",
    retrieval_pb2.SEARCH_MODE_SPARSE: "sparse",
}


def add_hits(response: retrieval_pb2.SearchResponse, hits: list[dict[str, Any]]) -> None:
    """Append search hits (the searcher's dicts) to a SearchResponse."""
    for hit in hits:
        metadata = Struct()
        metadata.update(hit["metadata"])
        response.hits.add(
            document_id=hit["document_id"],
            chunk_id=hit["chunk_id"],
            score=hit["score"],
            text=hit["text"],
            title=hit["title"],
            metadata=metadata,
        )


def collection_message(snapshot: Snapshot, reranker: str = "") -> retrieval_pb2.Collection:
    return retrieval_pb2.Collection(
        reranker=reranker,
        name=snapshot.meta.name,
        id=snapshot.meta.id,
        created=snapshot.meta.created,
        documents=snapshot.documents,
        chunks=len(snapshot.chunks),
        index_version=snapshot.meta.version,
        index_type=snapshot.index_type,
    )


class RetrievalServicer(retrieval_pb2_grpc.RetrievalServicer):
    def __init__(
        self,
        settings: RetrievalSettings,
        store: CollectionStore,
        searcher: Searcher,
        embedder: Embedder,
        ingestion: Ingestion,
        rerankers: Rerankers,
    ) -> None:
        self._settings = settings
        self._store = store
        self._searcher = searcher
        self._embedder = embedder
        self._ingestion = ingestion
        self._rerankers = rerankers

    async def Search(  # noqa: N802 - gRPC method name
        self, request: retrieval_pb2.SearchRequest, context: ServicerContext
    ) -> retrieval_pb2.SearchResponse:
        if not 1 <= request.top_k <= self._settings.max_top_k:
            raise invalid_request(f"top_k must be between 1 and {self._settings.max_top_k}.", param="top_k")
        if not request.query.strip():
            raise invalid_request("query must not be empty.", param="query")
        mode = MODE_NAMES.get(request.mode)
        if mode is None:
            raise invalid_request("mode must be hybrid, dense or sparse.", param="mode")
        # The query's embedding is read from the cache while the collection is looked up.
        prefetched = self._searcher.prefetch(request.query, mode)
        try:
            view = await self._store.resolve(request.collection)
            hits, cached = await self._searcher.search(
                view, request.query, mode, request.top_k, not request.no_cache, prefetched
            )
        finally:
            if prefetched is not None and not prefetched.done():
                prefetched.cancel()  # not needed: no such collection, an empty one, a cached result
            elif prefetched is not None and not prefetched.cancelled():
                prefetched.exception()  # read, so that an unused failed read is not reported as lost
        response = retrieval_pb2.SearchResponse(
            index_version=view.global_version if view.global_version is not None else view.snapshot.meta.version,
            cached=cached,
            collection_id=view.snapshot.meta.id,
            reranker=view.reranker,
        )
        add_hits(response, hits)
        return response

    async def Embed(  # noqa: N802
        self, request: retrieval_pb2.EmbedRequest, context: ServicerContext
    ) -> retrieval_pb2.EmbedResponse:
        if request.model and request.model != self._embedder.model_name:
            raise RagmeshError(
                ErrorKind.NOT_FOUND,
                f"The model `{request.model}` does not exist.",
                param="model",
                code="model_not_found",
            )
        inputs = list(request.inputs)
        if not inputs:
            raise invalid_request("input must not be empty.", param="input")
        if len(inputs) > self._settings.max_embed_inputs:
            raise invalid_request(f"input accepts at most {self._settings.max_embed_inputs} items.", param="input")
        truncate = (request.truncate or "NONE").upper()
        if truncate not in ("NONE", "START", "END"):
            raise invalid_request("truncate must be NONE, START or END.", param="truncate")
        counts = await self._embedder.count_tokens_async(inputs)
        for i, (text, count) in enumerate(zip(inputs, counts, strict=True)):
            if not text:
                raise invalid_request(f"input[{i}] must not be an empty string.", param="input")
            if count > self._embedder.max_tokens and truncate == "NONE":
                raise invalid_request(
                    f"input[{i}] is {count} tokens long; this model reads at most {self._embedder.max_tokens} "
                    "(truncate START or END cuts it).",
                    param="input",
                    code="context_length_exceeded",
                )
        if truncate != "NONE" and any(count > self._embedder.max_tokens for count in counts):
            inputs = await self._embedder.truncate_async(inputs, keep_end=truncate == "START")
            counts = [min(count, self._embedder.max_tokens) for count in counts]
        vectors = await self._embedder.embed(inputs, bulk=len(inputs) > INTERACTIVE_EMBED_INPUTS)
        return retrieval_pb2.EmbedResponse(
            vectors=np.ascontiguousarray(vectors, dtype="<f4").tobytes(),
            dimensions=self._embedder.dimensions,
            model=self._embedder.model_name,
            prompt_tokens=sum(counts),
        )

    async def CreateCollection(  # noqa: N802
        self, request: retrieval_pb2.CollectionRequest, context: ServicerContext
    ) -> retrieval_pb2.Collection:
        snapshot = await self._store.create(request.name, request.reranker)
        await self._announce(
            ingest_pb2.IndexEvent(
                collection=snapshot.meta.name,
                collection_id=snapshot.meta.id,
                created=ingest_pb2.CollectionCreated(created=snapshot.meta.created),
            )
        )
        return collection_message(snapshot, request.reranker)

    async def GetCollection(  # noqa: N802
        self, request: retrieval_pb2.CollectionRequest, context: ServicerContext
    ) -> retrieval_pb2.Collection:
        view = await self._store.resolve(request.name)
        message = collection_message(view.snapshot, view.reranker)
        if view.global_version is not None:
            message.index_version = view.global_version
        return message

    async def UpdateCollection(  # noqa: N802
        self, request: retrieval_pb2.UpdateCollectionRequest, context: ServicerContext
    ) -> retrieval_pb2.Collection:
        if request.HasField("reranker"):
            await self._store.set_reranker(request.name, request.reranker)
        return await self.GetCollection(retrieval_pb2.CollectionRequest(name=request.name), context)

    async def DeleteCollection(  # noqa: N802
        self, request: retrieval_pb2.CollectionRequest, context: ServicerContext
    ) -> retrieval_pb2.Collection:
        snapshot = await self._store.delete(request.name)
        await self._announce(
            ingest_pb2.IndexEvent(
                collection=snapshot.meta.name, collection_id=snapshot.meta.id, deleted=ingest_pb2.CollectionDeleted()
            )
        )
        return collection_message(snapshot)

    async def ListCollections(  # noqa: N802
        self, request: retrieval_pb2.ListCollectionsRequest, context: ServicerContext
    ) -> retrieval_pb2.ListCollectionsResponse:
        names = await self._store.names()
        response = retrieval_pb2.ListCollectionsResponse()
        for name in names:
            try:
                view = await self._store.resolve(name)
            except RagmeshError:
                continue  # deleted meanwhile
            response.collections.append(collection_message(view.snapshot, view.reranker))
        return response

    async def ListModels(  # noqa: N802
        self, request: common_pb2.ListModelsRequest, context: ServicerContext
    ) -> common_pb2.ListModelsResponse:
        card = common_pb2.ModelCard(
            id=self._embedder.model_name,
            owned_by="ragmesh",
            created=0,
            max_context=self._embedder.max_tokens,
            backend="embedded",
            capabilities=["embedding"],
            backend_type="embedded",
        )
        return common_pb2.ListModelsResponse(models=[card, *self._rerankers.cards()])

    async def Rerank(  # noqa: N802
        self, request: common_pb2.RerankRequest, context: ServicerContext
    ) -> common_pb2.RerankResponse:
        self._rerankers.get(request.model)  # an unknown model is a 404 before anything else
        if not request.query.strip():
            raise invalid_request("query must not be empty.", param="query")
        documents = list(request.documents)
        if not documents:
            raise invalid_request("documents must not be empty.", param="documents")
        if len(documents) > self._settings.max_rerank_documents:
            raise invalid_request(
                f"documents accepts at most {self._settings.max_rerank_documents} items.", param="documents"
            )
        scores = await self._rerankers.score(request.model, request.query, documents, request.truncate)
        relevances = None if scores.relevances is None else [float(r) for r in scores.relevances]
        return common_pb2.RerankResponse(
            results=ranked([float(x) for x in scores.logits], relevances),
            model=request.model,
            prompt_tokens=scores.tokens,
        )

    async def ExportCollection(  # noqa: N802
        self, request: retrieval_pb2.ExportCollectionRequest, context: ServicerContext
    ) -> AsyncIterator[retrieval_pb2.ExportCollectionResponse]:
        """This replica's copy of a collection, for a peer catching up (the snapshot is immutable:
        the copy is consistent even while changes are applied)."""
        snapshot = self._store.local(request.name)
        if snapshot is None:
            raise RagmeshError(ErrorKind.NOT_FOUND, f"This replica has no copy of '{request.name}'.", param="name")
        for part in export_parts(snapshot):
            yield part

    async def _announce(self, event: ingest_pb2.IndexEvent) -> None:
        try:
            await self._ingestion.announce(event)
        except Exception as exc:  # noqa: BLE001 - the registry already has the change
            # Other replicas also learn of a creation or deletion from the
            # registry on their next use of the collection; the event is the fast path.
            log.warning("index event not published", extra={"error": str(exc)})

"""Collections, documents, ingestion jobs and search: the retrieval service's API, in OpenAI's style."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict
from redis.exceptions import RedisError

from preprocess.clients import MeshClients
from preprocess.ingest import DocumentsRequest, IngestPublisher
from preprocess.keys import ApiKey
from preprocess.ownership import CollectionAccess
from preprocess.protocol import CreateCollectionRequest, SearchRequest, UpdateCollectionRequest
from preprocess.rag import SEARCH_MODES
from preprocess.reranking import Reranking, RerankOption
from preprocess.settings import PreprocessSettings
from ragmesh.errors import ErrorKind, RagmeshError, from_rpc_error, invalid_request
from ragmesh.grpc_client import call_metadata
from ragmesh.jobs import JobStore
from ragmesh.v1 import retrieval_pb2


def collection_object(collection: retrieval_pb2.Collection, shared: str | None = None) -> dict[str, Any]:
    return {
        "name": collection.name,
        "object": "collection",
        "id": collection.id,
        "created": collection.created,
        "documents": collection.documents,
        "chunks": collection.chunks,
        "index_version": collection.index_version,
        "index_type": collection.index_type,
        "reranker": collection.reranker or None,
        # "private", "read" or "write" (see preprocess.ownership); null: the operator's, read by every key.
        "shared": shared,
    }


class RetrievalServing:
    """Collections, documents, jobs and search, each a call to the retrieval service."""

    def __init__(
        self,
        clients: MeshClients,
        settings: PreprocessSettings,
        publisher: IngestPublisher,
        jobs: JobStore,
        reranking: Reranking,
        access: CollectionAccess,
    ) -> None:
        self._access = access
        self._clients = clients
        self._settings = settings
        self._publisher = publisher
        self._jobs = jobs
        self._reranking = reranking

    async def _call(self, method: Any, request: Any) -> Any:
        try:
            return await method(request, timeout=self._settings.retrieval_timeout, metadata=call_metadata())
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None

    # --- collections ------------------------------------------------------------

    async def _check_reranker(self, model: str | None) -> None:
        if model:
            await self._reranking.catalog.locate(model)  # 404 unknown, 400 not a reranker

    async def create_collection(self, request: CreateCollectionRequest, key: ApiKey | None = None) -> dict[str, Any]:
        await self._check_reranker(request.reranker)
        created = await self._call(
            self._clients.retrieval.CreateCollection,
            retrieval_pb2.CollectionRequest(name=request.name, reranker=request.reranker or ""),
        )
        return collection_object(created, await self._access.claim(request.name, key))

    async def update_collection(
        self, name: str, request: UpdateCollectionRequest, key: ApiKey | None = None
    ) -> dict[str, Any]:
        """PATCH /v1/collections/{name}: its default reranker, its sharing (the owner's alone)."""
        shared = await self._access.check(name, key, "owner")
        if "reranker" in request.model_fields_set:
            await self._check_reranker(request.reranker)
            collection = await self._call(
                self._clients.retrieval.UpdateCollection,
                retrieval_pb2.UpdateCollectionRequest(name=name, reranker=request.reranker or ""),
            )
        else:
            collection = await self._call(
                self._clients.retrieval.GetCollection, retrieval_pb2.CollectionRequest(name=name)
            )
        if request.shared is not None:
            shared = await self._access.share(name, key, request.shared)
        return collection_object(collection, shared)

    async def list_collections(self, key: ApiKey | None = None) -> dict[str, Any]:
        reply = await self._call(self._clients.retrieval.ListCollections, retrieval_pb2.ListCollectionsRequest())
        visible = await self._access.visible([c.name for c in reply.collections], key)
        return {
            "object": "list",
            "data": [collection_object(c, visible[c.name]) for c in reply.collections if c.name in visible],
        }

    async def all_collections(self) -> dict[str, Any]:
        """Every collection with its owner (the key id; null: the operator's) and sharing: the admin's view."""
        reply = await self._call(self._clients.retrieval.ListCollections, retrieval_pb2.ListCollectionsRequest())
        data = []
        for collection in reply.collections:
            record = await self._access.record(collection.name)
            body = collection_object(collection, record[1] if record else None)
            body["owner"] = record[0] if record else None
            data.append(body)
        return {"object": "list", "data": data}

    async def get_collection(self, name: str, key: ApiKey | None = None) -> dict[str, Any]:
        shared = await self._access.check(name, key, "read")
        reply = await self._call(self._clients.retrieval.GetCollection, retrieval_pb2.CollectionRequest(name=name))
        return collection_object(reply, shared)

    async def delete_collection(self, name: str, key: ApiKey | None = None) -> dict[str, Any]:
        await self._access.check(name, key, "owner")
        reply = await self._call(self._clients.retrieval.DeleteCollection, retrieval_pb2.CollectionRequest(name=name))
        await self._access.forget(name)
        return {"name": reply.name, "object": "collection.deleted", "deleted": True}

    # --- documents and jobs ---------------------------------------------------------

    async def add_documents(self, name: str, request: DocumentsRequest, key: ApiKey | None = None) -> dict[str, Any]:
        """Queue validated documents for ingestion into collection `name` (202: a job to watch)."""
        await self._access.check(name, key, "write")
        collection = await self._call(self._clients.retrieval.GetCollection, retrieval_pb2.CollectionRequest(name=name))
        accepted = await self._publisher.submit(collection.name, collection.id, request, key.id if key else "")
        return {
            "job_id": accepted.job_id,
            "object": "ingest.job",
            "status": "queued",
            "collection": collection.name,
            "documents": accepted.documents,
            "chunks": accepted.chunks,
        }

    async def get_job(self, job_id: str, key: ApiKey | None = None) -> dict[str, Any]:
        """A job, seen only by the key that submitted it (every job with auth off)."""
        try:
            job = await self._jobs.get(job_id, key.id if key is not None else None)
        except (RedisError, OSError) as exc:
            raise RagmeshError(
                ErrorKind.UNAVAILABLE, "The job store (Redis) is unavailable; retry shortly.", retry_after=1
            ) from exc
        if job is None:
            raise RagmeshError(
                ErrorKind.NOT_FOUND, f"Job '{job_id}' does not exist.", param="job_id", code="job_not_found"
            )
        return job

    # --- search ---------------------------------------------------------

    async def search(self, request: SearchRequest, key: ApiKey | None = None) -> dict[str, Any]:
        if key is not None:
            # With auth off (no key) every request reads every collection: the ACL read would
            # decide nothing and cost a Redis round trip on every search.
            await self._access.check(request.collection, key, "read")
        if request.rerank_candidates is not None and request.rerank_candidates > self._settings.max_rerank_candidates:
            raise invalid_request(
                f"'rerank_candidates' must be at most {self._settings.max_rerank_candidates}.",
                param="rerank_candidates",
            )
        reranked = await self._reranking.search(
            retrieval_pb2.SearchRequest(
                collection=request.collection,
                query=request.query,
                top_k=request.top_k,
                mode=SEARCH_MODES[request.mode],
                no_cache=not request.cache,
            ),
            RerankOption(request.rerank, request.rerank_candidates, request.rerank_required),
            self._settings.retrieval_timeout,
        )
        results = []
        for hit, rerank_score in zip(reranked.hits, reranked.rerank_scores, strict=True):
            result = {
                "document_id": hit.document_id,
                "chunk_id": hit.chunk_id,
                "score": hit.score,
                "text": hit.text,
                "title": hit.title,
                "metadata": MessageToDict(hit.metadata),
            }
            if rerank_score is not None:
                result["rerank_score"] = rerank_score
            results.append(result)
        return {
            "object": "list",
            "collection": request.collection,
            "mode": request.mode,
            "index_version": reranked.found.index_version,
            "cached": reranked.found.cached,
            **reranked.summary(),
            "results": results,
        }

"""HTTP endpoints backed by retrieval: collections, documents, jobs, search, embeddings."""

from __future__ import annotations

import array
import base64
import sys
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import grpc
import orjson
from google.protobuf.json_format import MessageToDict
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, ValidationError
from redis.exceptions import RedisError

from preprocess.clients import MeshClients
from preprocess.ingest import IngestPublisher, parse_documents
from preprocess.protocol import parse_chat_request, parse_completion_request, validation_error
from preprocess.reranking import Reranking, RerankOption
from preprocess.settings import PreprocessSettings
from ragmesh.errors import ErrorKind, RagmeshError, from_rpc_error, invalid_request
from ragmesh.grpc_client import call_metadata
from ragmesh.jobs import JobStore
from ragmesh.v1 import retrieval_pb2

SEARCH_MODES = {
    "hybrid": retrieval_pb2.SEARCH_MODE_HYBRID,
    "dense": retrieval_pb2.SEARCH_MODE_DENSE,
    "sparse": retrieval_pb2.SEARCH_MODE_SPARSE,
}


class CreateCollection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: StrictStr
    reranker: StrictStr | None = None  # the default reranking model of its searches


class UpdateCollection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reranker: StrictStr | None  # null: no default reranker


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    collection: StrictStr = Field(min_length=1)
    query: StrictStr = Field(min_length=1)
    top_k: int = Field(default=5, ge=1, le=100)
    mode: Literal["hybrid", "dense", "sparse"] = "hybrid"
    cache: bool = True
    # A reranking model, true (the collection's default), false (none); unset: the collection's default.
    rerank: StrictBool | StrictStr | None = None
    rerank_candidates: int | None = Field(default=None, ge=1)
    rerank_required: StrictBool = False

    def option(self) -> RerankOption:
        return RerankOption(self.rerank, self.rerank_candidates, self.rerank_required)


class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    input: StrictStr | list[StrictStr] | list[int] | list[list[int]]
    model: StrictStr
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: StrictStr | None = None


def collection_object(collection: retrieval_pb2.Collection) -> dict[str, Any]:
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
    }


def _validated(model: type[BaseModel], body: Any) -> Any:
    if not isinstance(body, dict):
        raise invalid_request("The request body must be a JSON object.")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc) from None


class RetrievalApi:
    def __init__(
        self,
        clients: MeshClients,
        settings: PreprocessSettings,
        publisher: IngestPublisher,
        jobs: JobStore,
        reranking: Reranking,
    ) -> None:
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

    async def create_collection(self, body: Any) -> dict[str, Any]:
        request = _validated(CreateCollection, body)
        await self._check_reranker(request.reranker)
        created = await self._call(
            self._clients.retrieval.CreateCollection,
            retrieval_pb2.CollectionRequest(name=request.name, reranker=request.reranker or ""),
        )
        return collection_object(created)

    async def update_collection(self, name: str, body: Any) -> dict[str, Any]:
        """PATCH /v1/collections/{name}: its default reranker."""
        request = _validated(UpdateCollection, body)
        await self._check_reranker(request.reranker)
        updated = await self._call(
            self._clients.retrieval.UpdateCollection,
            retrieval_pb2.UpdateCollectionRequest(name=name, reranker=request.reranker or ""),
        )
        return collection_object(updated)

    async def list_collections(self) -> dict[str, Any]:
        reply = await self._call(self._clients.retrieval.ListCollections, retrieval_pb2.ListCollectionsRequest())
        return {"object": "list", "data": [collection_object(c) for c in reply.collections]}

    async def get_collection(self, name: str) -> dict[str, Any]:
        reply = await self._call(self._clients.retrieval.GetCollection, retrieval_pb2.CollectionRequest(name=name))
        return collection_object(reply)

    async def delete_collection(self, name: str) -> dict[str, Any]:
        reply = await self._call(self._clients.retrieval.DeleteCollection, retrieval_pb2.CollectionRequest(name=name))
        return {"name": reply.name, "object": "collection.deleted", "deleted": True}

    # --- documents and jobs ---------------------------------------------------------

    async def add_documents(self, name: str, body: Any) -> dict[str, Any]:
        request = parse_documents(body, self._settings)
        collection = await self._call(self._clients.retrieval.GetCollection, retrieval_pb2.CollectionRequest(name=name))
        accepted = await self._publisher.submit(collection.name, collection.id, request)
        return {
            "job_id": accepted.job_id,
            "object": "ingest.job",
            "status": "queued",
            "collection": collection.name,
            "documents": accepted.documents,
            "chunks": accepted.chunks,
        }

    async def get_job(self, job_id: str) -> dict[str, Any]:
        try:
            job = await self._jobs.get(job_id)
        except (RedisError, OSError) as exc:
            raise RagmeshError(ErrorKind.UNAVAILABLE, "The job store (Redis) is unavailable; retry shortly.") from exc
        if job is None:
            raise RagmeshError(
                ErrorKind.NOT_FOUND, f"Job '{job_id}' does not exist.", param="job_id", code="job_not_found"
            )
        return job

    # --- search and embeddings ---------------------------------------------------------

    async def search(self, body: Any) -> dict[str, Any]:
        request = _validated(SearchRequest, body)
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
            request.option(),
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

    async def embeddings(self, body: Any) -> dict[str, Any]:
        request = _validated(EmbeddingsRequest, body)
        inputs = [request.input] if isinstance(request.input, str) else request.input
        if not inputs:
            raise invalid_request("'input' must not be empty.", param="input")
        if not all(isinstance(item, str) for item in inputs):
            raise invalid_request("Token arrays are not supported as 'input'; send text.", param="input")
        if request.dimensions is not None:
            raise invalid_request("'dimensions' is not supported by this model.", param="dimensions")
        reply = await self._call(
            self._clients.retrieval.Embed, retrieval_pb2.EmbedRequest(model=request.model, inputs=inputs)
        )
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


def runner(
    settings: PreprocessSettings, chat: Any, retrieval: RetrievalApi
) -> Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]:
    """How a batch line or a direct-protocol request runs: the same path as over HTTP."""

    async def run(url: str, body: dict[str, Any]) -> dict[str, Any]:
        if url == "/v1/embeddings":
            return await retrieval.embeddings(body)
        if url == "/v1/chat/completions":
            request: Any = parse_chat_request(body, settings.max_n)
        else:
            request = parse_completion_request(body, settings.max_n)
        result: dict[str, Any] = orjson.loads(await chat.complete(request))
        return result

    return run

"""Collections, documents, ingestion jobs and search over HTTP (ragmesh's RAG extensions)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from starlette.responses import Response

from preprocess.api.deps import ApiKeyDep, RetrievalDep, json_body, model_body
from preprocess.api.openapi import errors, request_body
from preprocess.api.responses import json_response
from preprocess.ingest import DocumentsRequest, parse_documents
from preprocess.protocol import CreateCollectionRequest, SearchRequest, UpdateCollectionRequest
from preprocess.serving import schemas

router = APIRouter(tags=["retrieval"], responses=errors(400, 401, 404, 429, 503, 504))


@router.post(
    "/v1/collections",
    status_code=201,
    summary="Create a collection.",
    response_model=schemas.Collection,
    openapi_extra=request_body(CreateCollectionRequest),
    responses=errors(403, 409),
)
async def create_collection(
    request: Annotated[CreateCollectionRequest, Depends(model_body(CreateCollectionRequest))],
    retrieval: RetrievalDep,
    key: ApiKeyDep,
) -> Response:
    return json_response(await retrieval.create_collection(request, key), 201)


@router.get("/v1/collections", summary="List collections.", response_model=schemas.CollectionList)
async def list_collections(retrieval: RetrievalDep, key: ApiKeyDep) -> Response:
    return json_response(await retrieval.list_collections(key))


@router.get("/v1/collections/{name}", summary="One collection's counts and index.", response_model=schemas.Collection)
async def get_collection(name: str, retrieval: RetrievalDep, key: ApiKeyDep) -> Response:
    return json_response(await retrieval.get_collection(name, key))


@router.patch(
    "/v1/collections/{name}",
    summary="Change a collection's settings (its default reranker).",
    response_model=schemas.Collection,
    openapi_extra=request_body(UpdateCollectionRequest),
)
async def update_collection(
    name: str,
    request: Annotated[UpdateCollectionRequest, Depends(model_body(UpdateCollectionRequest))],
    retrieval: RetrievalDep,
    key: ApiKeyDep,
) -> Response:
    return json_response(await retrieval.update_collection(name, request, key))


@router.delete("/v1/collections/{name}", summary="Delete a collection.", response_model=schemas.CollectionDeleted)
async def delete_collection(name: str, retrieval: RetrievalDep, key: ApiKeyDep) -> Response:
    return json_response(await retrieval.delete_collection(name, key))


@router.post(
    "/v1/collections/{name}/documents",
    status_code=202,
    summary="Queue documents for ingestion (202 with a job to watch).",
    response_model=schemas.IngestAccepted,
    openapi_extra=request_body(DocumentsRequest),
    responses=errors(413, 415),
)
async def add_documents(
    name: str,
    request: Annotated[DocumentsRequest, Depends(json_body(parse_documents))],
    retrieval: RetrievalDep,
    key: ApiKeyDep,
) -> Response:
    return json_response(await retrieval.add_documents(name, request, key), 202)


@router.get("/v1/jobs/{job_id}", summary="An ingestion job's status and progress.", response_model=schemas.IngestJob)
async def get_job(job_id: str, retrieval: RetrievalDep, key: ApiKeyDep) -> Response:
    return json_response(await retrieval.get_job(job_id, key))


@router.post(
    "/v1/search",
    summary="Hybrid, dense or sparse search of a collection.",
    response_model=schemas.SearchResponse,
    openapi_extra=request_body(SearchRequest),
    responses=errors(413, 415),
)
async def search(
    request: Annotated[SearchRequest, Depends(model_body(SearchRequest))], retrieval: RetrievalDep, key: ApiKeyDep
) -> Response:
    return json_response(await retrieval.search(request, key))

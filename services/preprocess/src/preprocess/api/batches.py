"""OpenAI Files and Batches over HTTP."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from starlette.responses import Response

from preprocess.api.deps import BatchesDep, OwnerDep, SettingsDep, json_body
from preprocess.api.http_io import read_upload
from preprocess.api.openapi import errors, request_body
from preprocess.api.responses import json_response
from preprocess.serving import schemas

router = APIRouter(tags=["files and batches"], responses=errors(400, 401, 404, 429, 503))


def _as_sent(body: Any, settings: Any) -> Any:
    return body


@router.post(
    "/v1/files",
    summary="Upload a batch input file (JSONL, checked whole).",
    response_model=schemas.FileObject,
    openapi_extra=request_body(schemas.FileUpload, "multipart/form-data"),
    responses=errors(413, 415),
)
async def upload_file(raw_request: Request, batches: BatchesDep, owner: OwnerDep, settings: SettingsDep) -> Response:
    data, filename, purpose = await read_upload(raw_request, settings.max_file_bytes)
    return json_response(await batches.upload(data, filename, purpose, owner))


@router.get(
    "/v1/files", summary="The key's files, newest first (or oldest with order=asc).", response_model=schemas.FileList
)
async def list_files(
    batches: BatchesDep,
    owner: OwnerDep,
    purpose: str | None = None,
    after: str | None = None,
    limit: int = 10_000,
    order: Literal["asc", "desc"] = "desc",
) -> Response:
    limit = max(1, min(limit, 10_000))
    return json_response(await batches.files.list(owner, purpose=purpose, after=after, limit=limit, order=order))


@router.get("/v1/files/{file_id}", summary="A file's description.", response_model=schemas.FileObject)
async def get_file(file_id: str, batches: BatchesDep, owner: OwnerDep) -> Response:
    return json_response(await batches.files.info(file_id, owner))


@router.delete("/v1/files/{file_id}", summary="Delete a file and its contents.", response_model=schemas.FileDeleted)
async def delete_file(file_id: str, batches: BatchesDep, owner: OwnerDep) -> Response:
    return json_response(await batches.files.delete(file_id, owner))


@router.get(
    "/v1/files/{file_id}/content",
    summary="A file's contents (JSONL).",
    response_class=Response,
    responses={200: {"content": {"application/jsonl": {"schema": {"type": "string"}}}}},
)
async def file_content(file_id: str, batches: BatchesDep, owner: OwnerDep) -> Response:
    return Response(await batches.files.content(file_id, owner), media_type="application/jsonl")


@router.post(
    "/v1/batches",
    summary="Run an uploaded file's lines as a batch.",
    response_model=schemas.Batch,
    openapi_extra=request_body(schemas.CreateBatchRequest),
    responses=errors(413, 415),
)
async def create_batch(
    body: Annotated[Any, Depends(json_body(_as_sent))], batches: BatchesDep, owner: OwnerDep
) -> Response:
    return json_response(await batches.create(body, owner))


@router.get("/v1/batches", summary="The key's batches, newest first.", response_model=schemas.BatchList)
async def list_batches(
    batches: BatchesDep, owner: OwnerDep, limit: Annotated[int, Query()] = 20, after: str | None = None
) -> Response:
    return json_response(await batches.list(max(1, min(limit, 100)), after, owner))


@router.get("/v1/batches/{batch_id}", summary="A batch's status and counts.", response_model=schemas.Batch)
async def get_batch(batch_id: str, batches: BatchesDep, owner: OwnerDep) -> Response:
    return json_response(await batches.get(batch_id, owner))


@router.post(
    "/v1/batches/{batch_id}/cancel",
    summary="Cancel a batch (lines in flight stop within a second).",
    response_model=schemas.Batch,
    responses=errors(409),
)
async def cancel_batch(batch_id: str, batches: BatchesDep, owner: OwnerDep) -> Response:
    return json_response(await batches.cancel(batch_id, owner))

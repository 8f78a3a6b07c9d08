"""The admin API over HTTP, on the admin listener only: every route needs the admin key."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from starlette.responses import Response

from preprocess.api.deps import AdminDep, RetrievalDep, model_body, require_admin
from preprocess.api.openapi import errors, request_body
from preprocess.api.responses import json_response
from preprocess.serving import schemas
from preprocess.serving.admin import CreateKeyRequest, SetBackendKeyRequest, audited

router = APIRouter(tags=["admin"], dependencies=[Depends(require_admin)], responses=errors(401, 404, 503))


@router.post(
    "/v1/admin/keys",
    status_code=201,
    summary="Create an API key (its secret is shown this once).",
    response_model=schemas.ApiKeyCreated,
    openapi_extra=request_body(CreateKeyRequest),
    responses=errors(400, 413, 415),
)
async def create_key(
    request: Annotated[CreateKeyRequest, Depends(model_body(CreateKeyRequest))], admin: AdminDep
) -> Response:
    return json_response(await admin.create_key(request), 201)


@router.get("/v1/admin/keys", summary="Every API key (never their secrets).", response_model=schemas.ApiKeyList)
async def list_keys(admin: AdminDep) -> Response:
    return json_response(await admin.list_keys())


@router.delete("/v1/admin/keys/{key_id}", summary="Revoke an API key.", response_model=schemas.ApiKeyObject)
async def revoke_key(key_id: str, admin: AdminDep) -> Response:
    return json_response(await admin.revoke_key(key_id))


@router.post(
    "/v1/admin/reload-backends",
    summary="Read the inference backends file again (a bad file is refused, naming the line).",
    response_model=schemas.BackendsReloaded,
    responses=errors(400),
)
async def reload_backends(admin: AdminDep) -> Response:
    return json_response(await admin.reload_backends())


@router.get(
    "/v1/admin/backends",
    summary="Inference backends: circuit state, requests in flight, last error, key source (never a key).",
    response_model=schemas.BackendList,
)
async def list_backends(admin: AdminDep) -> Response:
    return json_response(await admin.list_backends())


@router.put(
    "/v1/admin/backends/{name}/key",
    summary="Set a backend's key at run time (used from the next request on; never returned or logged).",
    response_model=schemas.BackendInfo,
    openapi_extra=request_body(SetBackendKeyRequest),
    responses=errors(400, 413, 415),
)
async def set_backend_key(
    name: str,
    request: Annotated[SetBackendKeyRequest, Depends(model_body(SetBackendKeyRequest))],
    admin: AdminDep,
) -> Response:
    return json_response(await admin.set_backend_key(name, request))


@router.delete(
    "/v1/admin/backends/{name}/key",
    summary="Revert a backend's key to the configured source (api_key_env / api_key_file).",
    response_model=schemas.BackendInfo,
)
async def revert_backend_key(name: str, admin: AdminDep) -> Response:
    return json_response(await admin.revert_backend_key(name))


@router.get(
    "/v1/admin/collections",
    summary="Every collection, whoever owns it, with its owner (a key id) and sharing.",
    response_model=schemas.CollectionList,
)
async def list_all_collections(retrieval: RetrievalDep) -> Response:
    async with audited("collections.list"):
        return json_response(await retrieval.all_collections())

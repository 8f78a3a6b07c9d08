"""POST /v1/embeddings over HTTP."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from starlette.responses import Response

from preprocess.api.deps import ApiKeyDep, ServingDep, json_body
from preprocess.api.openapi import errors, request_body
from preprocess.api.responses import json_response
from preprocess.keys import check_model_allowed
from preprocess.protocol import EmbeddingsRequest
from preprocess.serving.operations import EMBEDDINGS

router = APIRouter(tags=["embeddings"], responses=errors(400, 401, 404, 413, 415, 429, 503, 504))


@router.post(
    EMBEDDINGS.url,
    summary=EMBEDDINGS.summary,
    response_model=EMBEDDINGS.response,
    openapi_extra=request_body(EMBEDDINGS.request),
)
async def create_embeddings(
    request: Annotated[EmbeddingsRequest, Depends(json_body(EMBEDDINGS))], serving: ServingDep, key: ApiKeyDep
) -> Response:
    check_model_allowed(key, request.model)
    return json_response(await EMBEDDINGS.run(serving, request))

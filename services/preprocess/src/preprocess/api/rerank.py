"""POST /v1/rerank (the Cohere/Jina shape vLLM serves) and POST /v1/ranking (NVIDIA NIM's shape) over HTTP."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from starlette.responses import Response

from preprocess.api.deps import ApiKeyDep, RerankDep, model_body
from preprocess.api.openapi import errors, request_body
from preprocess.api.responses import json_response
from preprocess.serving import schemas
from preprocess.serving.rerank import RankingBody, RerankBody

router = APIRouter(tags=["rerank"], responses=errors(400, 401, 404, 413, 415, 429, 502, 503, 504))


@router.post(
    "/v1/rerank",
    summary="Score documents against a query with a reranking model (Cohere/Jina/vLLM shape).",
    response_model=schemas.RerankResponse,
    openapi_extra=request_body(RerankBody),
)
async def rerank(
    request: Annotated[RerankBody, Depends(model_body(RerankBody))], serving: RerankDep, key: ApiKeyDep
) -> Response:
    return json_response(await serving.rerank(request, key))


@router.post(
    "/v1/ranking",
    summary="Rank passages against a query with a reranking model (NVIDIA NIM shape).",
    response_model=schemas.RankingResponse,
    openapi_extra=request_body(RankingBody),
)
async def ranking(
    request: Annotated[RankingBody, Depends(model_body(RankingBody))], serving: RerankDep, key: ApiKeyDep
) -> Response:
    return json_response(await serving.ranking(request, key))

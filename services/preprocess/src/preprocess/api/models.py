"""GET /v1/models and GET /v1/models/{model} over HTTP."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.responses import Response

from preprocess.api.deps import ApiKeyDep, ModelsDep
from preprocess.api.openapi import errors
from preprocess.api.responses import json_response
from preprocess.serving import schemas

router = APIRouter(tags=["models"], responses=errors(401, 429, 503))


@router.get("/v1/models", summary="The models this key may use.", response_model=schemas.ModelList)
async def list_models(models: ModelsDep, key: ApiKeyDep) -> Response:
    return json_response(await models.page(key))


@router.get(
    "/v1/models/{model:path}",
    summary="One model (ids may contain slashes).",
    response_model=schemas.ModelCard,
    responses=errors(404),
)
async def get_model(model: str, models: ModelsDep, key: ApiKeyDep) -> Response:
    return json_response(await models.detail(model, key))

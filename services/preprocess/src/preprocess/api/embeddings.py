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
from ragmesh.errors import invalid_request

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
    check_interactive_size(request, serving.settings.max_embedding_input_chars)
    return json_response(await EMBEDDINGS.run(serving, request, key))


def check_interactive_size(request: EmbeddingsRequest, limit: int) -> None:
    """Interactive embeddings share the lane search embeds its queries on: an input past `limit`
    characters is a 400 here (batches take longer inputs on their own lane)."""
    inputs = [request.input] if isinstance(request.input, str) else request.input
    for i, item in enumerate(inputs):
        if isinstance(item, str) and len(item) > limit:
            raise invalid_request(
                f"Input {i} is {len(item)} characters; at most {limit} are accepted per input "
                "(send longer texts through /v1/batches).",
                param="input",
                code="input_too_large",
            )

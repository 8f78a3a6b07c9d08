"""Liveness and readiness, documented (the handlers are every service's, from ragmesh.ops)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from preprocess.serving import schemas
from ragmesh import ops

router = APIRouter(tags=["health"])


@router.get("/v1/health/live", summary="The service answers.", response_model=schemas.Live)
async def live(request: Request) -> Response:
    return await ops.live(request)


@router.get(
    "/v1/health/ready",
    summary="Every dependency answers (503 naming those that do not).",
    response_model=schemas.Ready,
    responses={503: {"model": schemas.Ready, "description": "Not ready"}},
)
async def ready(request: Request) -> Response:
    return await ops.ready(request)

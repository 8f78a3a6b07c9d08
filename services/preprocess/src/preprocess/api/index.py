"""GET /: the endpoint index (method, path, one line each), for API clients.

A browser (Accept: text/html) never gets here when a web console is set up:
nginx sends it to the console.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.routing import APIRoute
from starlette.responses import Response

from preprocess.api.responses import json_response
from preprocess.serving import schemas


def index_router(routers: list[APIRouter]) -> APIRouter:
    """GET / listing every documented route of `routers`."""
    endpoints = [
        {"method": method, "path": route.path_format, "description": route.summary or ""}
        for router in routers
        for route in router.routes
        if isinstance(route, APIRoute) and route.include_in_schema
        for method in sorted(route.methods or ())
    ]
    router = APIRouter(tags=["index"])

    @router.get("/", summary="This index.", response_model=schemas.EndpointIndex)
    async def index() -> Response:
        return json_response({"object": "index", "name": "ragmesh", "endpoints": endpoints})

    return router

"""/v1/{path}: any /v1 request the mesh does not serve itself, forwarded to the backend that owns it.

Registered last: the mesh's own routes win. A path the mesh serves with another
method is still a 405; the admin API is never reachable here (it has its own
listener). Authentication, per-key limits, the body limit and the request id
apply as on every route; the body and the answer pass through unchanged.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.responses import Response, StreamingResponse

from preprocess.api.deps import ApiKeyDep, ForwardDep, SettingsDep
from preprocess.api.http_io import read_raw
from preprocess.api.openapi import errors
from preprocess.keys import check_model_allowed
from preprocess.serving.forward import model_of
from preprocess.serving.sse import SSE_HEADERS
from ragmesh.errors import ErrorKind, RagmeshError

METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]

_ANY_BODY = {
    "requestBody": {
        "required": False,
        "content": {
            "application/json": {"schema": {"type": "object", "description": "Passed to the backend as sent."}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


def forwarding_router(served: list[APIRouter]) -> APIRouter:
    """The catch-all route, told which paths the mesh serves itself (those answer 405, not a forward)."""
    own = [route.path_regex for router in served for route in router.routes if isinstance(route, APIRoute)]
    router = APIRouter(tags=["forwarding"])

    async def forward(
        path: str, raw_request: Request, forwarder: ForwardDep, settings: SettingsDep, key: ApiKeyDep
    ) -> Response:
        full = f"/v1/{path}"
        if full == "/v1/admin" or full.startswith("/v1/admin/"):
            raise RagmeshError(
                ErrorKind.NOT_FOUND,
                f"Unknown request URL: {raw_request.method} {full}. The admin API is served on the admin listener.",
                code="unknown_url",
            )
        if any(pattern.match(full) for pattern in own):
            raise HTTPException(status_code=405)
        body = await read_raw(raw_request, settings.max_body_bytes)
        content_type = raw_request.headers.get("content-type", "")
        model = model_of(body, content_type)
        if model:
            check_model_allowed(key, model)
        forwarded = await forwarder.open(
            raw_request.method,
            f"/{path}",
            raw_request.url.query,
            body,
            content_type,
            raw_request.headers.get("accept", ""),
            model,
        )
        headers = dict(forwarded.headers)
        if headers.get("content-type", "").startswith("text/event-stream"):
            headers.update(SSE_HEADERS)
        return StreamingResponse(forwarded.body, status_code=forwarded.status, headers=headers)

    for method in METHODS:  # one route per method: each its own operation in /openapi.json
        router.add_api_route(
            "/v1/{path:path}",
            forward,
            methods=[method],
            operation_id=f"forward_{method.lower()}",
            summary="Forwarded to the backend owning the body's `model`, else the backend configured for the path.",
            response_class=Response,
            responses={
                200: {
                    "description": "The backend's answer, passed through (JSON, server-sent events or binary).",
                    "content": {
                        "application/json": {"schema": {"type": "object"}},
                        "text/event-stream": {"schema": {"type": "string"}},
                        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                    },
                },
                **errors(401, 404, 405, 413, 429, 503, 504),
            },
            openapi_extra=_ANY_BODY if method in ("POST", "PUT", "PATCH") else None,
        )
    return router

"""Every error leaves the HTTP front as an OpenAI error body with the table's status."""

from __future__ import annotations

import logging

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from ragmesh.errors import ErrorKind, RagmeshError, from_exception, openai_error_body

log = logging.getLogger(__name__)

_KIND_BY_HTTP_STATUS = {
    400: ErrorKind.INVALID_REQUEST,
    401: ErrorKind.AUTHENTICATION,
    403: ErrorKind.PERMISSION,
    404: ErrorKind.NOT_FOUND,
    413: ErrorKind.PAYLOAD_TOO_LARGE,
    415: ErrorKind.UNSUPPORTED_MEDIA_TYPE,
    429: ErrorKind.RATE_LIMITED,
    503: ErrorKind.UNAVAILABLE,
    504: ErrorKind.DEADLINE,
}


# Ollama's API: its clients read errors as {"error": "<message>"}.
OLLAMA_PREFIX = "/api/"


def ollama_path(path: str) -> bool:
    """Whether `path` is Ollama's API, whose errors are Ollama's shape."""
    return path.startswith(OLLAMA_PREFIX)


def error_body(err: RagmeshError, path: str = "") -> dict[str, object]:
    """The error's body: OpenAI's envelope, or Ollama's under /api/."""
    return {"error": err.message} if ollama_path(path) else err.to_openai()


def error_response(err: RagmeshError, path: str = "") -> Response:
    """Render a domain error as the HTTP response a client sees (Ollama's shape under /api/)."""
    headers = dict(err.headers)
    if err.retry_after is not None:
        headers["Retry-After"] = str(err.retry_after)
    return Response(
        orjson.dumps(error_body(err, path)),
        status_code=err.http_status,
        media_type="application/json",
        headers=headers,
    )


async def _ragmesh_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RagmeshError)
    if exc.http_status >= 500:
        log.warning("request failed", extra={"kind": exc.kind.value, "error": exc.message})
    return error_response(exc, request.url.path)


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 405 and ollama_path(request.url.path):
        body: dict[str, object] = {"error": f"method {request.method} not allowed"}
        return Response(orjson.dumps(body), status_code=405, media_type="application/json")
    if exc.status_code == 405:
        body = openai_error_body(
            f"Method {request.method} not allowed for {request.url.path}.",
            "invalid_request_error",
            None,
            "method_not_allowed",
        )
        return Response(orjson.dumps(body), status_code=405, media_type="application/json")
    kind = _KIND_BY_HTTP_STATUS.get(exc.status_code, ErrorKind.INVALID_REQUEST)
    message = (
        f"Unknown request URL: {request.method} {request.url.path}." if exc.status_code == 404 else str(exc.detail)
    )
    return error_response(
        RagmeshError(kind, message, code="unknown_url" if exc.status_code == 404 else None), request.url.path
    )


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0]
    param = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "path", "query")) or None
    return error_response(
        RagmeshError(ErrorKind.INVALID_REQUEST, f"Invalid '{param}': {first.get('msg')}", param=param),
        request.url.path,
    )


async def _store_unavailable(request: Request, exc: Exception) -> Response:
    """Redis away or slow (a timeout, a pause): the client may retry, it is no server bug."""
    log.warning("request failed: Redis unavailable", extra={"error": repr(exc)})
    return error_response(from_exception(exc), request.url.path)


async def _unhandled(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error")
    return error_response(
        RagmeshError(ErrorKind.INTERNAL, "The server had an error while processing your request."), request.url.path
    )


def install_error_handlers(app: FastAPI) -> None:
    """Map every exception type to an OpenAI-shaped body (never a bare 500, never 422)."""
    app.add_exception_handler(RagmeshError, _ragmesh_error)
    app.add_exception_handler(StarletteHTTPException, _http_exception)
    app.add_exception_handler(RequestValidationError, _validation_error)
    # Any Redis error (away, slow, loading, read-only, refusing): a dependency down, 503.
    app.add_exception_handler(RedisError, _store_unavailable)
    app.add_exception_handler(Exception, _unhandled)

"""The HTTP side every service has: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

log = logging.getLogger(__name__)

# A readiness check returns one status per dependency: "ok" or a reason.
ReadyCheck = Callable[[], Awaitable[dict[str, str]]]


def _json(body: object, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


async def live(request: Request) -> Response:
    """GET /v1/health/live: the process answers."""
    return _json({"status": "live"})


async def ready(request: Request) -> Response:
    """GET /v1/health/ready: 200 when every dependency answers, else 503 naming the ones that do not."""
    check: ReadyCheck | None = getattr(request.app.state, "ready_check", None)
    if check is None:
        return _json({"status": "starting"}, 503)
    try:
        deps = await asyncio.wait_for(check(), timeout=5.0)
    except TimeoutError:
        return _json({"status": "not ready", "dependencies": {"check": "timed out"}}, 503)
    ready = all(v == "ok" for v in deps.values())
    if not ready:
        # Why a dependency is down goes to the log; the (public) answer names it, never its error text.
        log.warning("not ready", extra={"dependencies": {k: v for k, v in deps.items() if v != "ok"}})
    public = {name: "ok" if status == "ok" else "down" for name, status in deps.items()}
    return _json({"status": "ready" if ready else "not ready", "dependencies": public}, 200 if ready else 503)


async def _metrics(request: Request) -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


def ops_routes(health: bool = True) -> list[Route]:
    """Routes for /v1/health/live, /v1/health/ready (unless `health` is off: an app declaring them
    itself) and /metrics.

    Readiness calls `app.state.ready_check`, which the service sets once it started.
    """
    routes = [Route("/metrics", _metrics, methods=["GET"])]
    if health:
        routes[:0] = [
            Route("/v1/health/live", live, methods=["GET"]),
            Route("/v1/health/ready", ready, methods=["GET"]),
        ]
    return routes

"""Running a service: uvicorn for the HTTP side, a grpc.aio server in its lifespan.

uvicorn owns the process's signals: SIGTERM runs the lifespan's shutdown, which
drains the gRPC server, so every service stops the same way.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
import uvicorn
from starlette.applications import Starlette

from ragmesh.grpc_server import add_health, create_server
from ragmesh.ops import ReadyCheck, ops_routes
from ragmesh.settings import ServiceSettings

log = logging.getLogger(__name__)


async def _always_ready() -> dict[str, str]:
    return {}


@dataclass
class GrpcService:
    """What a gRPC service hands to the runner once its resources are up."""

    register: Callable[[grpc.aio.Server], None]
    service_names: Sequence[str]
    ready_check: ReadyCheck = field(default=_always_ready)


def run_http(app: Any, settings: ServiceSettings) -> None:
    """Serve an ASGI app on the service's HTTP port until SIGTERM/SIGINT."""
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.http_port,
        log_config=None,
        access_log=False,
        loop="asyncio",  # grpc.aio runs on the standard asyncio loop
        timeout_graceful_shutdown=int(settings.shutdown_grace),
        timeout_keep_alive=75,  # longer than nginx's upstream keepalive_timeout
    )
    asyncio.run(uvicorn.Server(config).serve())


def run_grpc_service(
    settings: ServiceSettings,
    resources: Callable[[], AbstractAsyncContextManager[GrpcService]],
) -> None:
    """Run a gRPC service with its ops HTTP endpoints (health, metrics).

    `resources` opens what the service needs (models, connections) and yields
    the servicers to register; it is entered when the process starts serving
    and exited after the gRPC server drained.
    """

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with resources() as service:
            server = create_server()
            service.register(server)
            health = await add_health(server, list(service.service_names))
            address = f"{settings.host}:{settings.grpc_port}"
            if server.add_insecure_port(address) == 0:
                raise RuntimeError(f"cannot listen on {address}")
            await server.start()
            app.state.ready_check = service.ready_check
            log.info("gRPC listening", extra={"address": address})
            try:
                yield
            finally:
                await health.enter_graceful_shutdown()
                await server.stop(settings.shutdown_grace)

    run_http(Starlette(routes=ops_routes(), lifespan=lifespan), settings)

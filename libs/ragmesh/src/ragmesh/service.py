"""Running a service: uvicorn for the HTTP side, a grpc.aio server in its lifespan, graceful drain.

uvicorn owns the process's signals. SIGTERM drains every service the same way:

1. at once, the app's drain hooks run (`app.state.on_drain`): a gRPC server's
   health goes NOT_SERVING (balanced clients stop picking this replica) and
   queue consumers stop taking messages;
2. uvicorn stops accepting HTTP connections and lets requests in flight (open
   SSE streams included) finish, for up to `shutdown_grace` seconds;
3. the lifespan's shutdown: `drain_delay` after step 1 the gRPC server refuses
   new calls (a client retries them on another replica) and gives the calls and
   streams in flight what is left of the grace; then the service's resources
   close (messages still in hand by then go back to their queue).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
import uvicorn
from starlette.applications import Starlette

from ragmesh.grpc_client import use_service_token
from ragmesh.grpc_server import add_health, create_server, server_options, set_serving
from ragmesh.ops import ReadyCheck, ops_routes
from ragmesh.settings import GrpcServiceSettings, ServiceSettings

log = logging.getLogger(__name__)

# Run when SIGTERM arrives, before the HTTP side drains: stop taking new work.
DrainHook = Callable[[], Awaitable[None]]


async def _always_ready() -> dict[str, str]:
    return {}


async def _serving_now() -> None:
    return None


@dataclass
class GrpcService:
    """What a gRPC service hands to the runner once its resources are up."""

    register: Callable[[grpc.aio.Server], None]
    service_names: Sequence[str]
    ready_check: ReadyCheck = field(default=_always_ready)
    # Awaited after the server started; health stays NOT_SERVING until it returns
    # (a retrieval replica catching up with its peers).
    until_serving: Callable[[], Awaitable[None]] = field(default=_serving_now)
    # Stop taking new work (queue consumers) when SIGTERM arrives.
    on_drain: Sequence[DrainHook] = ()


def drain_hooks(app: Any) -> list[DrainHook]:
    """The app's list of drain hooks (created empty on first use); append to it in the lifespan."""
    hooks: list[DrainHook] | None = getattr(app.state, "on_drain", None)
    if hooks is None:
        hooks = []
        app.state.on_drain = hooks
    return hooks


class DrainingServer(uvicorn.Server):
    """uvicorn's server, running the app's drain hooks the moment it is told to stop."""

    def __init__(self, config: uvicorn.Config, app: Any) -> None:
        super().__init__(config)
        self._app = app

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._app.state.draining_since = time.monotonic()
        hooks = list(getattr(self._app.state, "on_drain", None) or [])
        results = await asyncio.gather(*(hook() for hook in hooks), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                log.warning("drain hook failed", extra={"error": repr(result)})
        log.info("draining", extra={"hooks": len(hooks)})
        await super().shutdown(sockets)


def drain_deadline(app: Any, grace: float) -> float:
    """The monotonic time by which everything in flight must be done (grace from SIGTERM)."""
    since = getattr(app.state, "draining_since", None)
    return (since if since is not None else time.monotonic()) + grace


def run_http(app: Any, settings: ServiceSettings) -> None:
    """Serve an ASGI app on the service's HTTP port until SIGTERM/SIGINT, draining on the way out."""
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.http_port,
        log_config=None,
        access_log=False,
        loop=settings.event_loop,
        timeout_graceful_shutdown=max(1, int(settings.shutdown_grace)),
        timeout_keep_alive=75,  # longer than nginx's upstream keepalive_timeout
    )
    # Server.run makes the loop `config.loop` names (asyncio.run would always make asyncio's own).
    DrainingServer(config, app).run()


def run_grpc_service(
    settings: GrpcServiceSettings,
    resources: Callable[[], AbstractAsyncContextManager[GrpcService]],
) -> None:
    """Run a gRPC service with its ops HTTP endpoints (health, metrics).

    `resources` opens what the service needs (models, connections) and yields
    the servicers to register; it is entered when the process starts serving
    and exited after the gRPC server drained.
    """

    use_service_token(settings.service_token)  # this service's own calls to its peers

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with resources() as service:
            names = list(service.service_names)
            server = create_server(
                server_options(settings.grpc_max_connection_age, settings.grpc_max_connection_age_grace),
                settings.service_token,
            )
            service.register(server)
            health = await add_health(server, names, serving=False)
            address = f"{settings.host}:{settings.grpc_port}"
            if server.add_insecure_port(address) == 0:
                raise RuntimeError(f"cannot listen on {address}")
            await server.start()

            async def become_serving() -> None:
                await service.until_serving()
                await set_serving(health, names, True)
                app.state.ready_check = service.ready_check
                log.info("serving", extra={"address": address})

            async def stop_serving() -> None:
                serving.cancel()
                await health.enter_graceful_shutdown()  # NOT_SERVING, for good

            serving = asyncio.create_task(become_serving())
            hooks = drain_hooks(app)
            hooks.append(stop_serving)
            hooks.extend(service.on_drain)
            log.info("gRPC listening", extra={"address": address})
            try:
                yield
            finally:
                await stop_serving()  # no-op after SIGTERM's hook; not so when stopped otherwise
                # Clients watching our health have seen NOT_SERVING by now; a call that
                # still arrives after this is refused and retried on another replica.
                delay = drain_deadline(app, settings.drain_delay) - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                grace = max(0.0, drain_deadline(app, settings.shutdown_grace) - time.monotonic())
                await server.stop(grace)

    run_http(Starlette(routes=ops_routes(), lifespan=lifespan), settings)

"""Settings base class: every service's settings come from RAGMESH_* environment variables."""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServiceSettings(BaseSettings):
    """Fields every service has. Subclasses set their own env prefix (RAGMESH_<SERVICE>_).

    Dependencies shared by the whole mesh (Redis, RabbitMQ) are read from one
    mesh-wide variable, so an operator sets them once.
    """

    # validate_by_name: code (and tests) may pass fields by name even where an
    # environment alias exists.
    model_config = SettingsConfigDict(extra="ignore", env_file=None, validate_by_name=True, validate_by_alias=True)

    host: str = "127.0.0.1"
    grpc_port: int = 0
    http_port: int = 0
    log_level: str = Field(default="INFO", validation_alias=AliasChoices("RAGMESH_LOG_LEVEL", "LOG_LEVEL"))
    # The event loop every service runs on (HTTP, gRPC, Redis, AMQP alike). "auto": uvloop
    # where it is installed (uvicorn[standard]), asyncio's own otherwise. uvloop takes less
    # CPU per request on the gateway's hot path (bench/gateway_overhead.py); grpc.aio runs on
    # either (its completion queue is polled by a thread that wakes the loop through a socket).
    event_loop: Literal["auto", "uvloop", "asyncio"] = Field(
        default="auto", validation_alias=AliasChoices("RAGMESH_EVENT_LOOP")
    )
    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices("RAGMESH_REDIS_URL", "REDIS_URL"),
    )
    amqp_url: str = Field(
        default="amqp://guest:guest@127.0.0.1:5672/",
        validation_alias=AliasChoices("RAGMESH_AMQP_URL", "AMQP_URL"),
    )
    # The service credential of the gRPC plane: every call between services carries it and
    # every server checks it (a shared token from a Kubernetes Secret, or one `make up`
    # generates). Empty: calls are not checked (tests that start one service alone).
    service_token: str = Field(default="", validation_alias=AliasChoices("RAGMESH_SERVICE_TOKEN"), repr=False)
    # Prefix for every queue, exchange and Redis key, so that several meshes (or
    # test runs) can share one Redis and one RabbitMQ without seeing each other.
    namespace: str = Field(default="", validation_alias=AliasChoices("RAGMESH_NAMESPACE"))
    # Draining on SIGTERM: health goes NOT_SERVING at once (clients stop sending new
    # calls), `drain_delay` seconds later new calls are refused, and calls, streams
    # and queue messages in flight get `shutdown_grace` seconds to finish before
    # they are cancelled (messages not acked by then go back to their queue).
    # Kubernetes' terminationGracePeriodSeconds must be longer than both together.
    shutdown_grace: float = 25.0
    drain_delay: float = 1.0
    # gRPC servers close each connection after about this many seconds (GOAWAY;
    # calls in flight go on for up to the grace), so clients resolve their target
    # again and spread to replicas added since. 0: never.
    grpc_max_connection_age: float = 30.0
    grpc_max_connection_age_grace: float = 600.0

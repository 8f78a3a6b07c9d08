"""Settings base classes: every service's settings come from RAGMESH_* environment variables.

A service has only the settings it reads, so a secret reaches only the services that use
it: `ServiceSettings` is what every service has (its HTTP port, logging, the service
credential, the drain grace), and a service adds the parts it uses by inheriting them:

- `GrpcServiceSettings`: a gRPC server (inference, retrieval, postprocess; preprocess serves
  HTTP only and is a gRPC client);
- `RedisSettings`: the Redis URL, with its password (preprocess, retrieval, postprocess);
- `AmqpSettings`: the RabbitMQ URL, with its user and password (preprocess, retrieval).

compose.yml, deploy/k8s and scripts/mesh.py pass each secret to those services only
(tests/unit/test_settings_scope.py holds them to it).
"""

from __future__ import annotations

import ipaddress
from typing import Literal

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Hosts only this machine reaches: a service listening there may run without the service
# credential (tests and single-service runs); anywhere else it may not.
LOOPBACK_HOSTS = ("localhost",)


def is_loopback(host: str) -> bool:
    """Whether `host` (a listen address) is reachable from this machine only."""
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


class ServiceSettings(BaseSettings):
    """Fields every service has. Subclasses set their own env prefix (RAGMESH_<SERVICE>_).

    Values shared by the whole mesh (the service credential, the log level) are read
    from one mesh-wide variable, so an operator sets them once.
    """

    # validate_by_name: code (and tests) may pass fields by name even where an
    # environment alias exists.
    model_config = SettingsConfigDict(extra="ignore", env_file=None, validate_by_name=True, validate_by_alias=True)

    host: str = "127.0.0.1"
    http_port: int = 0
    log_level: str = Field(default="INFO", validation_alias=AliasChoices("RAGMESH_LOG_LEVEL", "LOG_LEVEL"))
    # The event loop every service runs on (HTTP, gRPC, Redis, AMQP alike). "auto": uvloop
    # where it is installed (uvicorn[standard]), asyncio's own otherwise. uvloop takes less
    # CPU per request on the gateway's hot path (bench/gateway_overhead.py); grpc.aio runs on
    # either (its completion queue is polled by a thread that wakes the loop through a socket).
    event_loop: Literal["auto", "uvloop", "asyncio"] = Field(
        default="auto", validation_alias=AliasChoices("RAGMESH_EVENT_LOOP")
    )
    # The service credential of the gRPC plane: every call between services carries it and
    # every server checks it (a shared token from a Kubernetes Secret, or one `make up`
    # generates). Empty: calls are not checked, which a service allows only while it
    # listens on loopback (tests that start one service alone).
    service_token: str = Field(default="", validation_alias=AliasChoices("RAGMESH_SERVICE_TOKEN"), repr=False)
    # Draining on SIGTERM: requests, streams and queue messages in flight get this many
    # seconds to finish before they are cancelled (messages not acked by then go back to
    # their queue). Kubernetes' terminationGracePeriodSeconds must be longer.
    shutdown_grace: float = 25.0

    @model_validator(mode="after")
    def _credential_off_loopback(self) -> ServiceSettings:
        # One service without the token while its peers have one either refuses their calls
        # or (a server) takes anyone's: past loopback that is an open internal plane.
        if not self.service_token and not is_loopback(self.host):
            raise ValueError(
                f"RAGMESH_SERVICE_TOKEN is empty but this service listens on {self.host}: set the same "
                "RAGMESH_SERVICE_TOKEN for every service (the gRPC plane's credential), or listen on 127.0.0.1"
            )
        return self


class GrpcServiceSettings(ServiceSettings):
    """A service that serves gRPC: its port, the drain delay and connection ages."""

    grpc_port: int = 0
    # Draining: health goes NOT_SERVING at once (clients stop sending new calls),
    # `drain_delay` seconds later new calls are refused; calls in flight get what is
    # left of `shutdown_grace`.
    drain_delay: float = 1.0
    # gRPC servers close each connection after about this many seconds (GOAWAY;
    # calls in flight go on for up to the grace), so clients resolve their target
    # again and spread to replicas added since. 0: never.
    grpc_max_connection_age: float = 30.0
    grpc_max_connection_age_grace: float = 600.0


class NamespacedSettings(ServiceSettings):
    """A service with state in Redis or RabbitMQ: the prefix it names that state with."""

    # Prefix for every queue, exchange and Redis key, so that several meshes (or
    # test runs) can share one Redis and one RabbitMQ without seeing each other.
    namespace: str = Field(default="", validation_alias=AliasChoices("RAGMESH_NAMESPACE"))


class RedisSettings(NamespacedSettings):
    """A service that uses Redis: its URL, credentials included (a secret)."""

    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices("RAGMESH_REDIS_URL", "REDIS_URL"),
        repr=False,
    )


class AmqpSettings(NamespacedSettings):
    """A service that uses RabbitMQ: its URL, user and password included (a secret)."""

    amqp_url: str = Field(
        default="amqp://guest:guest@127.0.0.1:5672/",
        validation_alias=AliasChoices("RAGMESH_AMQP_URL", "AMQP_URL"),
        repr=False,
    )

"""Settings base class: every service's settings come from RAGMESH_* environment variables."""

from __future__ import annotations

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
    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices("RAGMESH_REDIS_URL", "REDIS_URL"),
    )
    amqp_url: str = Field(
        default="amqp://guest:guest@127.0.0.1:5672/",
        validation_alias=AliasChoices("RAGMESH_AMQP_URL", "AMQP_URL"),
    )
    # Prefix for every queue, exchange and Redis key, so that several meshes (or
    # test runs) can share one Redis and one RabbitMQ without seeing each other.
    namespace: str = Field(default="", validation_alias=AliasChoices("RAGMESH_NAMESPACE"))
    # Seconds a stopping service waits for in-flight calls before it cancels them.
    shutdown_grace: float = 5.0

"""Postprocess settings (env prefix RAGMESH_POSTPROCESS_)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from ragmesh.settings import GrpcServiceSettings, RedisSettings

PiiKind = Literal["email", "phone", "card"]
PII_KINDS: tuple[PiiKind, ...] = ("email", "phone", "card")


class PostprocessSettings(GrpcServiceSettings, RedisSettings):
    # Redis for the response cache; no RabbitMQ (it consumes and publishes nothing).
    model_config = SettingsConfigDict(env_prefix="RAGMESH_POSTPROCESS_", extra="ignore")

    grpc_port: int = 50053
    http_port: int = 8003

    # Guardrails applied to every answer as it streams. PII kinds: email, phone, card.
    pii_redaction: list[PiiKind] = Field(default_factory=lambda: list(PII_KINDS))
    # Terms (case-insensitive, whole words or phrases) no answer may contain.
    blocklist: list[str] = Field(default_factory=list)
    # "stop": end the answer before the term (finish_reason content_filter);
    # "redact": replace the term and go on.
    blocklist_action: Literal["stop", "redact"] = "stop"

    response_cache_ttl: int = 24 * 3600

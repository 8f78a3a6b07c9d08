"""Retrieval settings (env prefix RAGMESH_RETRIEVAL_)."""

from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from ragmesh.settings import ServiceSettings


class RetrievalSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="RAGMESH_RETRIEVAL_", extra="ignore")

    grpc_port: int = 50052
    http_port: int = 8002

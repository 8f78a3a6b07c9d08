"""Postprocess settings (env prefix RAGMESH_POSTPROCESS_)."""

from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from ragmesh.settings import ServiceSettings


class PostprocessSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="RAGMESH_POSTPROCESS_", extra="ignore")

    grpc_port: int = 50053
    http_port: int = 8003

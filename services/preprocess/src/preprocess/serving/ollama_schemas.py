"""Response shapes of Ollama's API as the gateway serves it, for /openapi.json."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class OllamaError(BaseModel):
    """Every error under /api/: Ollama's shape, with the status the error table gives it."""

    error: str


class OllamaChatMessage(_Open):
    role: str
    content: str
    tool_calls: list[dict[str, Any]] | None = None


class _Done(_Open):
    model: str
    created_at: str
    done: bool
    done_reason: str | None = None
    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None
    prompt_eval_duration: int | None = None
    eval_count: int | None = None
    eval_duration: int | None = None


class OllamaChatResponse(_Done):
    """With `stream` (the default), application/x-ndjson lines of this shape, the last with done: true."""

    message: OllamaChatMessage


class OllamaGenerateResponse(_Done):
    """With `stream` (the default), application/x-ndjson lines of this shape, the last with done: true."""

    response: str


class OllamaEmbedResponse(_Open):
    model: str
    embeddings: list[list[float]]
    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None


class OllamaEmbeddingResponse(_Open):
    embedding: list[float]


class OllamaModel(_Open):
    name: str
    model: str
    modified_at: str
    size: int
    digest: str
    details: dict[str, Any]


class OllamaTags(_Open):
    models: list[OllamaModel]


class OllamaRunning(_Open):
    models: list[dict[str, Any]]


class OllamaShowResponse(_Open):
    modelfile: str
    parameters: str
    template: str
    details: dict[str, Any]
    model_info: dict[str, Any]
    capabilities: list[str] = Field(description='"completion", "tools", "vision", "embedding"')


class OllamaVersion(_Open):
    version: str

"""The backends file: which engines serve which models, with keys, limits and fallbacks.

YAML (or JSON, which is YAML), path from RAGMESH_INFERENCE_BACKENDS_FILE. See
deploy/backends.example.yaml. A file with an error is refused as a whole,
naming the line: at start the service does not start; on reload the running
configuration stays.
"""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(Exception):
    """A backends file that cannot be used; the message names the file and the line."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# What a model does, as model cards show it. `vision` lets image_url parts through,
# `audio` input_audio parts; a model's capabilities are its own, else its backend's.
CAPABILITIES = ("chat", "completion", "vision", "audio", "tools", "embedding", "rerank")
Capability = Literal["chat", "completion", "vision", "audio", "tools", "embedding", "rerank"]


class ModelEntry(_Strict):
    """A listed model with what it does (a plain id takes its backend's capabilities)."""

    id: str
    capabilities: list[Capability] | None = None


class Payload(_Strict):
    """How requests to a backend are shaped on the way out (after the client's body)."""

    # Top-level fields removed (an upstream that refuses `stream_options`, say).
    drop: list[str] = Field(default_factory=list)
    # Fields set whatever the client sent (JSON values).
    force: dict[str, Any] = Field(default_factory=dict)
    # False: the upstream is asked for whole answers; the mesh still streams to clients.
    stream: bool = True


class EmbeddedBackend(_Strict):
    """The in-process llama.cpp engine (its model and threads come from the inference settings)."""

    name: str
    type: Literal["embedded"]


class RerankApi(_Strict):
    """The reranking models an upstream serves, and which of the two reranking APIs it speaks."""

    # "ranking": NVIDIA NIM's POST /v1/ranking ({query: {text}, passages: [{text}]} -> rankings[].logit);
    # "rerank": the Cohere/Jina shape vLLM, TEI, Infinity serve (POST /v1/rerank -> results[].relevance_score).
    api: Literal["ranking", "rerank"]
    # Path under base_url; default /ranking or /rerank (the API catalog's hosted rerankers have their own).
    path: str | None = None
    models: list[str] = Field(min_length=1)

    @field_validator("path")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("/"):
            raise ValueError("path must start with /")
        return value

    def url_path(self) -> str:
        return self.path or ("/ranking" if self.api == "ranking" else "/rerank")


class UpstreamBackend(_Strict):
    """Any OpenAI-compatible endpoint: vLLM, Ollama's /v1, NVIDIA API catalog or NIM, OpenAI."""

    name: str
    type: Literal["openai"]
    base_url: str
    # The key is read from the environment or a file, never written in this file.
    api_key_env: str | None = None
    api_key_file: str | None = None
    # Longest silence between two reads of an answer (a stream may run longer in all);
    # the caller's deadline bounds the whole answer. A whole answer (a non-streamed request,
    # or payload.stream false) is one read: it must come within this.
    timeout: float = Field(default=120.0, gt=0)
    connect_timeout: float = Field(default=5.0, gt=0)
    max_concurrency: int = Field(default=32, ge=1)
    # Seconds a request waits for one of those slots; then 503 (overloaded) with Retry-After.
    queue_timeout: float = Field(default=30.0, ge=0)
    # Tokens a request may use at this endpoint (prompt + completion), for RAG's prompt fitting.
    context_length: int = Field(default=8192, ge=256)
    # Models: listed (ids, or {id, capabilities}), or discovered from the endpoint's
    # /models (filtered by the patterns).
    models: list[str | ModelEntry] = Field(default_factory=list)
    # What its models do unless a model says otherwise; empty: told by discovery,
    # else guessed from the id ("embed" -> embedding, "rerank" -> rerank, else chat).
    capabilities: list[Capability] = Field(default_factory=list)
    # /v1 paths (globs, below /v1: "/ranking", "/audio/*") forwarded here when the body names no model.
    paths: list[str] = Field(default_factory=list)
    payload: Payload = Field(default_factory=Payload)
    discover: bool = False
    include: list[str] = Field(default_factory=lambda: ["*"])
    exclude: list[str] = Field(default_factory=list)
    headers: dict[str, str] = Field(default_factory=dict)
    # Reranking models served here (listed in /v1/models with the "rerank" capability).
    rerank: RerankApi | None = None

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("base_url must start with http:// or https://")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _has_models(self) -> UpstreamBackend:
        if not self.models and not self.discover and self.rerank is None:
            raise ValueError("an upstream needs `models`, `discover: true` or `rerank`")
        if self.api_key_env and self.api_key_file:
            raise ValueError("give api_key_env or api_key_file, not both")
        return self

    def model_ids(self) -> list[str]:
        return [m if isinstance(m, str) else m.id for m in self.models]

    def listed_capabilities(self, model: str) -> list[str] | None:
        """The capabilities the file gives `model` (its own, else the backend's); None: not said."""
        for m in self.models:
            if isinstance(m, ModelEntry) and m.id == model and m.capabilities is not None:
                return list(m.capabilities)
        return list(self.capabilities) or None

    def takes_path(self, path: str) -> bool:
        return any(fnmatch.fnmatchcase(path, p) for p in self.paths)

    def key_source(self) -> str:
        if self.api_key_env:
            return f"env:{self.api_key_env}"
        return "file" if self.api_key_file else "none"

    def wants(self, model: str) -> bool:
        """Whether a discovered model passes the include/exclude patterns."""
        return any(fnmatch.fnmatchcase(model, p) for p in self.include) and not any(
            fnmatch.fnmatchcase(model, p) for p in self.exclude
        )

    def api_key(self) -> str | None:
        """The key, read at (re)load time; never logged nor returned."""
        if self.api_key_env:
            key = os.environ.get(self.api_key_env)
            if not key:
                raise ConfigError(f"backend {self.name!r}: environment variable {self.api_key_env} is not set")
            return key
        if self.api_key_file:
            try:
                return Path(self.api_key_file).read_text().strip()
            except OSError as exc:
                raise ConfigError(f"backend {self.name!r}: cannot read api_key_file: {exc.strerror}") from None
        return None


Backend = Annotated[EmbeddedBackend | UpstreamBackend, Field(discriminator="type")]


class Route(_Strict):
    """Per-model routing: which backends may serve it, and what to try when they all fail."""

    backends: list[str] = Field(default_factory=list)  # empty: every backend that serves the model
    fallback: list[str] = Field(default_factory=list)  # other model ids, in order


class RetryPolicy(_Strict):
    attempts: int = Field(default=3, ge=1, le=10)
    backoff_base: float = Field(default=0.2, ge=0)
    backoff_max: float = Field(default=5.0, ge=0)


class BreakerPolicy(_Strict):
    failures: int = Field(default=5, ge=1)  # consecutive failures that open a backend's circuit
    reset_after: float = Field(default=30.0, gt=0)  # seconds before one trial request (half-open)


class BackendsFile(_Strict):
    backends: list[Backend] = Field(min_length=1)
    routes: dict[str, Route] = Field(default_factory=dict)
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    circuit_breaker: BreakerPolicy = Field(default_factory=BreakerPolicy)

    @model_validator(mode="after")
    def _consistent(self) -> BackendsFile:
        names = [b.name for b in self.backends]
        duplicated = {n for n in names if names.count(n) > 1}
        if duplicated:
            raise ValueError(f"backend names must be unique: {sorted(duplicated)}")
        if sum(isinstance(b, EmbeddedBackend) for b in self.backends) > 1:
            raise ValueError("at most one embedded backend")
        for model, route in self.routes.items():
            unknown = set(route.backends) - set(names)
            if unknown:
                raise ValueError(f"route {model!r} names unknown backends {sorted(unknown)}")
        return self


DEFAULT = BackendsFile(backends=[EmbeddedBackend(name="embedded", type="embedded")])


def _line_of(root: yaml.Node | None, loc: tuple[int | str, ...]) -> int | None:
    """The 1-based line of the YAML node at a pydantic error location (nearest parent found)."""
    node, line = root, (root.start_mark.line + 1 if root is not None else None)
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next((v for k, v in node.value if getattr(k, "value", None) == part), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            match = node.value[part]
        else:
            match = None
        if match is None:
            break
        node, line = match, match.start_mark.line + 1
    return line


def parse_backends(text: str, source: str = "<backends>") -> BackendsFile:
    """Validate a backends file; ConfigError names the line of the first problem."""
    try:
        root = yaml.compose(text)
        raw: Any = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "?"
        raise ConfigError(f"{source}, {where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the file must be a mapping with a `backends` list")
    try:
        return BackendsFile.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        loc = tuple(p for p in first["loc"] if p not in ("embedded", "openai"))
        if first["type"] in ("union_tag_invalid", "union_tag_not_found"):
            loc += ("type",)  # point at the `type:` line itself
        line = _line_of(root, loc)
        path = ".".join(str(p) for p in loc) or "(top level)"
        raise ConfigError(f"{source}, line {line}: {path}: {first['msg']}") from None


def load_backends(path: str) -> BackendsFile:
    """The backends file at `path`, or the embedded engine alone when no path is set."""
    if not path:
        return DEFAULT
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    return parse_backends(text, path)

"""Response shapes of the public API, for /openapi.json (and for clients reading it).

The serving layer builds its answers as dicts (postprocess renders chat and
completion bodies); these models document those shapes. Fields a response may
add later are allowed (`extra="allow"`), as OpenAI's own schemas allow them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


# --- errors -----------------------------------------------------------------------


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None
    request_id: str | None = Field(default=None, description="The X-Request-ID of the request, to quote.")


class ErrorResponse(BaseModel):
    """Every error: OpenAI's envelope, with the status the error table gives it."""

    error: ErrorBody


# --- chat and completions ------------------------------------------------------------


class Usage(_Open):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Citation(_Open):
    index: int
    document_id: str
    chunk_id: str
    title: str = ""
    score: float
    snippet: str
    cited: bool
    rerank_score: float | None = Field(default=None, description="The reranker's relevance, when reranked.")


class ChatMessageOut(_Open):
    role: str
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChatChoice(_Open):
    index: int
    message: ChatMessageOut
    finish_reason: str | None
    logprobs: dict[str, Any] | None = None


class ChatCompletionResponse(_Open):
    """A chat completion; with `stream: true`, `text/event-stream` of chat.completion.chunk events instead."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    citations: list[Citation] | None = Field(default=None, description="RAG: the sources the prompt carried.")
    rag: dict[str, Any] | None = Field(default=None, description="RAG: what retrieval did.")


class CompletionChoice(_Open):
    index: int
    text: str
    finish_reason: str | None
    logprobs: dict[str, Any] | None = None


class CompletionResponse(_Open):
    """A legacy completion; with `stream: true`, `text/event-stream` of text_completion events instead."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


# --- embeddings ----------------------------------------------------------------------


class Embedding(_Open):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str = Field(description="Floats, or base64 of little-endian float32.")


class EmbeddingUsage(_Open):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(_Open):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


# --- models --------------------------------------------------------------------------


class ModelCard(_Open):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int | None = None
    capabilities: list[str] = Field(
        default_factory=list, description='What the model does: "chat", "vision", "tools", "embedding", "rerank", ...'
    )
    backend_type: str = Field(default="embedded", description='"embedded" (in the mesh) or "openai" (an upstream)')
    root: str | None = Field(default=None, description="An alias's base model.")
    parent: str | None = None
    rag: dict[str, Any] | None = Field(default=None, description="An alias's collection binding.")


class ModelList(_Open):
    object: Literal["list"]
    data: list[ModelCard]


# --- collections, documents, jobs, search -----------------------------------------


class Collection(_Open):
    name: str
    object: Literal["collection"]
    id: str
    created: int
    documents: int
    chunks: int
    index_version: int
    index_type: str
    reranker: str | None = Field(default=None, description="Default reranking model of its searches.")
    shared: Literal["private", "read", "write"] | None = Field(
        default=None, description="Who else may use it; null: the operator's, read by every key."
    )


class CollectionList(_Open):
    object: Literal["list"]
    data: list[Collection]


class CollectionDeleted(_Open):
    name: str
    object: Literal["collection.deleted"]
    deleted: bool


class IngestAccepted(_Open):
    job_id: str
    object: Literal["ingest.job"]
    status: str
    collection: str
    documents: int
    chunks: int


class IngestJob(_Open):
    id: str
    object: Literal["ingest.job"]
    collection: str
    status: Literal["queued", "running", "succeeded", "failed"]
    documents: int
    done: int
    total: int
    error: str | None = None
    created_at: int
    finished_at: int | None = None


class SearchResult(_Open):
    document_id: str
    chunk_id: str
    score: float
    text: str
    title: str
    metadata: dict[str, Any]
    rerank_score: float | None = Field(default=None, description="The reranker's relevance, when reranked.")


class SearchResponse(_Open):
    object: Literal["list"]
    collection: str
    mode: str
    index_version: int
    cached: bool
    rerank: Literal["ok", "skipped", "off"] = "off"
    rerank_model: str | None = None
    rerank_candidates: int | None = None
    rerank_reason: str | None = Field(default=None, description="Why the rerank was skipped (fused order).")
    results: list[SearchResult]


# --- files and batches ---------------------------------------------------------------


class FileObject(_Open):
    id: str
    object: Literal["file"]
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str
    expires_at: int | None = None


class FileList(_Open):
    object: Literal["list"]
    data: list[FileObject]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool


class FileDeleted(_Open):
    id: str
    object: Literal["file"]
    deleted: bool


class FileUpload(BaseModel):
    """multipart/form-data: the JSONL file and its purpose."""

    file: bytes = Field(json_schema_extra={"format": "binary"})
    purpose: Literal["batch"]


class CreateBatchRequest(BaseModel):
    """POST /v1/batches."""

    model_config = ConfigDict(extra="allow")

    input_file_id: str
    endpoint: str
    completion_window: Literal["24h"] = "24h"
    metadata: dict[str, str] | None = None


class BatchCounts(_Open):
    total: int
    completed: int
    failed: int


class Batch(_Open):
    id: str
    object: Literal["batch"]
    endpoint: str
    input_file_id: str
    completion_window: str
    status: str
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    request_counts: BatchCounts
    errors: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None


class BatchList(_Open):
    object: Literal["list"]
    data: list[Batch]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool


# --- admin ----------------------------------------------------------------------------


class ApiKeyObject(_Open):
    id: str
    object: Literal["api_key"]
    name: str
    created: int
    expires_at: int | None = None
    models: list[str] | None = None
    rpm: int | None = None
    tpm: int | None = None
    max_in_flight: int | None = None
    revoked: bool


class ApiKeyCreated(ApiKeyObject):
    key: str = Field(description="The secret, shown this once.")


class ApiKeyList(_Open):
    object: Literal["list"]
    data: list[ApiKeyObject]


class BackendsReloaded(_Open):
    object: Literal["backends.reloaded"]
    backends: list[str]
    models: list[str]


class BackendInfo(_Open):
    name: str
    type: str
    base_url: str = ""
    circuit: Literal["closed", "open", "half-open"]
    in_flight: int
    last_error: str | None = None
    last_error_at: int | None = None
    key_source: str = Field(description='"env:NAME", "file", "runtime" or "none" (never the key)')
    models: list[str]
    paths: list[str]


class BackendList(_Open):
    object: Literal["list"]
    data: list[BackendInfo]


class EndpointInfo(BaseModel):
    method: str
    path: str
    description: str


class EndpointIndex(_Open):
    object: Literal["index"]
    name: str
    endpoints: list[EndpointInfo]


# --- operations ---------------------------------------------------------------------


class Live(_Open):
    status: Literal["live"]


class Ready(_Open):
    status: str
    dependencies: dict[str, str] | None = None


# --- rerank ------------------------------------------------------------------------------


class RerankUsage(_Open):
    prompt_tokens: int
    total_tokens: int


class RerankDocument(_Open):
    text: str


class RerankResult(_Open):
    index: int
    relevance_score: float
    document: RerankDocument | None = None


class RerankResponse(_Open):
    """POST /v1/rerank: every document's relevance, best first (Cohere/Jina/vLLM shape)."""

    id: str
    model: str
    usage: RerankUsage
    results: list[RerankResult]


class Ranking(_Open):
    index: int
    logit: float


class RankingResponse(_Open):
    """POST /v1/ranking: every passage's logit, best first (NVIDIA NIM shape)."""

    rankings: list[Ranking]
    usage: RerankUsage | None = None

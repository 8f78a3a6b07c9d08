"""Request metrics as the client sees them, named after vLLM's (`vllm:*`) and NIM's.

Labelled by the model the client asked for (an alias stays an alias) and by
status: "ok" or the error kind (rate_limited, not_found, ...). The engine's own
slot metrics (running, waiting) live in the inference service; per-key usage in
preprocess.keys.
"""

from __future__ import annotations

import logging
import time

from prometheus_client import Counter, Histogram

from ragmesh.v1 import common_pb2

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120)

TTFT = Histogram(
    "ragmesh:time_to_first_token_seconds",
    "Time from request arrival to the first content chunk sent (streaming)",
    ["model"],
    buckets=_LATENCY_BUCKETS,
)
E2E_LATENCY = Histogram(
    "ragmesh:e2e_request_latency_seconds",
    "Time from request arrival to the last byte of the answer",
    ["model", "endpoint", "status"],
    buckets=_LATENCY_BUCKETS,
)
REQUESTS = Counter(
    "ragmesh:requests_total",
    "Chat, legacy completion and rerank requests by outcome",
    ["model", "endpoint", "stream", "status"],
)
# RAG's own stages as preprocess sees them: the search call (query embedding and search in
# retrieval, reranking when asked), and fitting the passages into the prompt (token counts).
RAG_STAGE_SECONDS = Histogram(
    "ragmesh_preprocess_rag_stage_seconds",
    "Time of a RAG stage",
    ["stage"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5),
)
PROMPT_TOKENS = Counter("ragmesh:prompt_tokens_total", "Prompt tokens of finished requests (from usage)", ["model"])
GENERATION_TOKENS = Counter(
    "ragmesh:generation_tokens_total", "Completion tokens of finished requests (from usage)", ["model"]
)


# A request refused for what the client sent may name any model: counting it
# under that name would let clients grow the label set without bound.
_CLIENT_ERRORS = frozenset({"invalid_request", "unsupported_media_type", "not_found", "payload_too_large"})


class RequestClock:
    """One completion request's measurements, from arrival to its last byte."""

    def __init__(self, model: str, endpoint: str, stream: bool) -> None:
        self.model = model
        self.endpoint = endpoint
        self.stream = "true" if stream else "false"
        self.arrived = time.perf_counter()

    def first_token(self) -> None:
        TTFT.labels(self.model).observe(time.perf_counter() - self.arrived)

    def finished(self, status: str, usage: common_pb2.Usage | None = None) -> None:
        """Count the request once, with its status ("ok" or an error kind)."""
        seconds = time.perf_counter() - self.arrived
        model = "(refused)" if status in _CLIENT_ERRORS else self.model
        E2E_LATENCY.labels(model, self.endpoint, status).observe(seconds)
        REQUESTS.labels(model, self.endpoint, self.stream, status).inc()
        tokens = {}
        if usage is not None:
            PROMPT_TOKENS.labels(self.model).inc(usage.prompt_tokens)
            GENERATION_TOKENS.labels(self.model).inc(usage.completion_tokens)
            tokens = {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens}
        log.info(
            "request finished",
            extra={"model": model, "endpoint": self.endpoint, "status": status, "seconds": round(seconds, 4), **tokens},
        )

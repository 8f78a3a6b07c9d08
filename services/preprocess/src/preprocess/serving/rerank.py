"""POST /v1/rerank (the Cohere/Jina shape vLLM serves) and POST /v1/ranking (NVIDIA NIM's shape).

Both answer from any reranking model the mesh serves, local or upstream: each
backend reports a raw logit (NIM's `logit`) and a relevance in [0, 1]
(Cohere's `relevance_score`). Inputs are checked here first (empty or too many
documents, a document over the character cap), the model's own token cap where
the model runs: over it, a 400 `context_length_exceeded` unless the request
allows truncation (`truncation: true` here, `truncate: "END"` on /v1/ranking;
vLLM and NIM refuse by default too).
"""

from __future__ import annotations

import logging
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr
from redis.exceptions import RedisError

from preprocess.keys import ApiKey, KeyStore, check_model_allowed
from preprocess.metrics import RequestClock
from preprocess.reranking import ForwardOnlyError, Reranking
from preprocess.serving.forward import ForwardServing
from preprocess.settings import PreprocessSettings
from ragmesh.errors import RagmeshError, invalid_request
from ragmesh.v1 import common_pb2

log = logging.getLogger(__name__)


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown fields are ignored, as vLLM does


class TextObject(_Lenient):
    text: StrictStr


class RerankBody(_Lenient):
    """POST /v1/rerank: documents as strings or objects with `text` (Cohere, Jina, vLLM)."""

    model: StrictStr = Field(min_length=1)
    query: StrictStr
    documents: list[StrictStr | TextObject]
    top_n: int | None = Field(default=None, ge=1)
    return_documents: StrictBool = True  # vLLM's default
    truncation: StrictBool = False


class RankingBody(_Lenient):
    """POST /v1/ranking: NVIDIA NIM's reranking request."""

    model: StrictStr = Field(min_length=1)
    query: TextObject
    passages: list[TextObject]
    truncate: Literal["NONE", "END"] = "NONE"


class RerankServing:
    """The two reranking endpoints over the mesh's reranking models (no HTTP here: bodies in, dicts out)."""

    def __init__(
        self,
        reranking: Reranking,
        settings: PreprocessSettings,
        keys: KeyStore | None,
        forward: ForwardServing | None = None,
    ) -> None:
        self._reranking = reranking
        self._settings = settings
        self._keys = keys
        self._forward = forward

    async def _forwarded(self, path: str, body: BaseModel, err: ForwardOnlyError) -> dict[str, Any]:
        """The request as the client sent it, to the upstream that owns the model (its own API)."""
        if self._forward is None:
            raise err
        sent = body.model_dump(mode="json", exclude_unset=True, by_alias=True)
        return await self._forward.json(path, err.model, sent)

    def _check(self, query: str, documents: list[str], param: str) -> None:
        if not query.strip():
            raise invalid_request("'query' must not be empty.", param="query")
        if not documents:
            raise invalid_request(f"'{param}' must not be empty.", param=param)
        limit = self._settings.rerank_max_documents
        if len(documents) > limit:
            raise invalid_request(
                f"'{param}' has {len(documents)} items; at most {limit} are accepted.",
                param=param,
                code="too_many_documents",
            )
        cap = self._settings.rerank_max_document_chars
        for i, text in enumerate(documents):
            if not text.strip():
                raise invalid_request(f"'{param}[{i}]' is empty.", param=f"{param}[{i}]")
            if len(text) > cap:
                raise invalid_request(
                    f"'{param}[{i}]' is {len(text)} characters long; at most {cap} are accepted.",
                    param=f"{param}[{i}]",
                    code="context_length_exceeded",
                )

    async def _scored(
        self, key: ApiKey | None, endpoint: str, model: str, query: str, documents: list[str], truncate: bool
    ) -> common_pb2.RerankResponse:
        clock = RequestClock(model, endpoint, False)
        try:
            check_model_allowed(key, model)
            self._check(query, documents, "passages" if endpoint == "ranking" else "documents")
            reply = await self._reranking.score(
                model, query, documents, truncate=truncate, deadline=self._settings.retrieval_timeout
            )
        except RagmeshError as err:
            clock.finished(err.kind.value)
            if endpoint == "ranking" and err.param == "documents":  # NIM calls them passages
                err.param = "passages"
                err.message = err.message.replace("documents[", "passages[")
            raise
        usage = common_pb2.Usage(prompt_tokens=reply.prompt_tokens, total_tokens=reply.prompt_tokens)
        clock.finished("ok", usage)
        await self._charge(key, reply.prompt_tokens)
        return reply

    async def _charge(self, key: ApiKey | None, tokens: int) -> None:
        """The tokens the reranker read count against the key's per-minute budget."""
        if self._keys is None or key is None or not tokens:
            return
        try:
            await self._keys.spend_tokens(key, tokens)
        except (RedisError, OSError) as exc:
            log.warning("tokens not charged: key store unavailable", extra={"error": str(exc)})

    async def rerank(self, body: RerankBody, key: ApiKey | None) -> dict[str, Any]:
        """POST /v1/rerank."""
        documents = [d if isinstance(d, str) else d.text for d in body.documents]
        try:
            reply = await self._scored(key, "rerank", body.model, body.query, documents, body.truncation)
        except ForwardOnlyError as err:
            return await self._forwarded("/rerank", body, err)
        results: list[dict[str, Any]] = []
        for scored in reply.results[: body.top_n]:
            result: dict[str, Any] = {"index": scored.index, "relevance_score": scored.relevance_score}
            if body.return_documents:
                result["document"] = {"text": documents[scored.index]}
            results.append(result)
        return {
            "id": f"rerank-{uuid.uuid4().hex}",
            "model": body.model,
            "usage": {"prompt_tokens": reply.prompt_tokens, "total_tokens": reply.prompt_tokens},
            "results": results,
        }

    async def ranking(self, body: RankingBody, key: ApiKey | None) -> dict[str, Any]:
        """POST /v1/ranking."""
        documents = [p.text for p in body.passages]
        try:
            reply = await self._scored(key, "ranking", body.model, body.query.text, documents, body.truncate == "END")
        except ForwardOnlyError as err:
            return await self._forwarded("/ranking", body, err)
        return {
            "rankings": [{"index": r.index, "logit": r.logit} for r in reply.results],
            "usage": {"prompt_tokens": reply.prompt_tokens, "total_tokens": reply.prompt_tokens},
        }

"""POST /v1/search's collection ACL read: made for a key, skipped with auth off (no key), where
every request reads every collection and the read decided nothing (a Redis round trip per search)."""

from __future__ import annotations

from typing import Any, cast

import pytest

from preprocess.keys import ApiKey
from preprocess.protocol import SearchRequest
from preprocess.reranking import Reranked
from preprocess.serving.retrieval import RetrievalServing
from preprocess.settings import PreprocessSettings
from ragmesh.errors import ErrorKind, RagmeshError
from ragmesh.v1 import retrieval_pb2


class Access:
    """Refuses every key (as for another tenant's private collection); counts the reads."""

    def __init__(self) -> None:
        self.reads: list[tuple[str, Any, str]] = []

    async def check(self, name: str, key: Any, need: str) -> None:
        self.reads.append((name, key, need))
        raise RagmeshError(ErrorKind.NOT_FOUND, f"Collection '{name}' does not exist.", param="collection")


class Reranking:
    def __init__(self) -> None:
        self.searches = 0

    async def search(self, search: retrieval_pb2.SearchRequest, option: Any, deadline: float) -> Reranked:
        self.searches += 1
        found = retrieval_pb2.SearchResponse(index_version=3)
        found.hits.add(document_id="d", chunk_id="d#0", score=0.5, text="t", title="")
        return Reranked(list(found.hits), [None], found)


def serving() -> tuple[RetrievalServing, Access, Reranking]:
    access, reranking = Access(), Reranking()
    settings = PreprocessSettings()
    none = cast(Any, None)
    return RetrievalServing(none, settings, none, none, cast(Any, reranking), cast(Any, access)), access, reranking


async def test_auth_off_searches_without_the_acl_read() -> None:
    retrieval, access, reranking = serving()
    body = await retrieval.search(SearchRequest.model_validate({"collection": "notes", "query": "q"}), None)
    assert access.reads == [] and reranking.searches == 1
    assert [hit["chunk_id"] for hit in body["results"]] == ["d#0"]


async def test_a_key_is_checked_before_the_search() -> None:
    retrieval, access, reranking = serving()
    key = ApiKey(id="bob", name="bob", created=0, expires_at=None, models=(), rpm=0, tpm=0)
    with pytest.raises(RagmeshError) as refused:
        await retrieval.search(SearchRequest.model_validate({"collection": "notes", "query": "q"}), key)
    assert refused.value.kind is ErrorKind.NOT_FOUND
    assert access.reads == [("notes", key, "read")] and reranking.searches == 0

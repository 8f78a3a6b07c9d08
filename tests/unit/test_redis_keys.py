"""The Redis key schema: every family's keys (byte-identical to what the services built by hand
before, so data already in Redis and the Lua scripts keep working), their documented TTLs,
and that no two families can ever build the same key."""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

import pytest

from postprocess.settings import PostprocessSettings
from preprocess.batches import direct
from preprocess.settings import PreprocessSettings
from ragmesh import jobs
from ragmesh.redis_keys import DEFAULT_NAMESPACE, DIRECT_ANSWER_TTL, FAMILIES, JOB_FINISHED_TTL, RedisKeys
from retrieval.settings import RetrievalSettings

NS = "t1"
KEYS = RedisKeys(NS)

# Every builder, the key it builds here, and the literal the services built before this module.
BUILT: dict[str, tuple[str, str]] = {
    "api_key": (KEYS.api_key("ab12"), "t1:apikey:ab12"),
    "api_key_index": (KEYS.api_key_index, "t1:apikeys"),
    "rate_limit": (KEYS.rate_limit("key_1", "rpm"), "t1:ratelimit:key_1:rpm"),
    "in_flight": (KEYS.in_flight("key_1"), "t1:inflight:key_1"),
    "job": (KEYS.job("job_1"), "t1:job:job_1"),
    "file": (KEYS.file("file-abc"), "t1:file:file-abc"),
    "files_index": (KEYS.files_index("key_1"), "t1:files:owner:key_1"),
    "files_expiry": (KEYS.files_expiry, "t1:files:expiry"),
    "batch_state": (KEYS.batch_state("batch_1"), "t1:batch:batch_1:state"),
    "batch_results": (KEYS.batch_results("batch_1"), "t1:batch:batch_1:results"),
    "batch_order": (KEYS.batch_order("batch_1"), "t1:batch:batch_1:order"),
    "batches_index": (KEYS.batches_index(None), "t1:batches:all"),
    "batches_active": (KEYS.batches_active, "t1:batches:active"),
    "batches_retired": (KEYS.batches_retired, "t1:batches:retired"),
    "direct_answer": (KEYS.direct_answer("key_1", "m-1"), "t1:direct:key_1:m-1"),
    "collection_acl": (KEYS.collection_acl("docs"), "t1:collection-acl:docs"),
    "collections": (KEYS.collections, "t1:collections"),
    "collections_epoch": (KEYS.collections_epoch, "t1:collections-epoch"),
    "collection_version": (KEYS.collection_version("c1"), "t1:collection-version:c1"),
    "embedding_prefix": (KEYS.embedding_prefix("mini"), "t1:emb:mini:"),
    "embedding": (KEYS.embedding("mini", "d1"), "t1:emb:mini:d1"),
    "search_result": (KEYS.search_result("c1", 3, "hybrid", 5, "q1"), "t1:search:c1:3:hybrid:5:q1"),
    "response": (KEYS.response("r1"), "t1:response:r1"),
}


def family_of(key: str) -> str:
    """The family a key belongs to: its segment after the namespace."""
    assert key.startswith(KEYS.prefix)
    return key[len(KEYS.prefix) :].split(":", 1)[0]


@pytest.mark.parametrize("builder", sorted(BUILT))
def test_each_builder_makes_the_key_the_services_made_before(builder: str) -> None:
    built, before = BUILT[builder]
    assert built == before


def test_every_builder_is_covered_and_belongs_to_a_documented_family() -> None:
    public = {
        name
        for name, member in inspect.getmembers(RedisKeys)
        if not name.startswith("_") and name != "pattern" and (callable(member) or isinstance(member, property))
    }
    assert public == set(BUILT), "a builder without a test row here (or a row without a builder)"
    names = {f.name for f in FAMILIES}
    assert {family_of(built) for built, _ in BUILT.values()} == names, "a family without a builder, or the reverse"


def test_no_two_families_can_build_the_same_key() -> None:
    """A family name holds no colon and every key is `{ns}:{family}` or `{ns}:{family}:...`, so a
    key's family is its first segment: keys of two distinct families always differ there."""
    names = [f.name for f in FAMILIES]
    assert len(names) == len(set(names))
    for name in names:
        assert name and ":" not in name and "*" not in name
    for builder, (built, _) in BUILT.items():
        rest = built[len(KEYS.prefix) + len(family_of(built)) :]
        assert rest == "" or rest.startswith(":"), builder
    # Inside a family the fixed parts keep apart what shares a family name.
    assert len({KEYS.files_index(None), KEYS.files_index("key_1"), KEYS.files_expiry}) == 3
    assert len({KEYS.batches_index(None), KEYS.batches_index("key_1"), KEYS.batches_active, KEYS.batches_retired}) == 4
    assert len({KEYS.batch_state("b"), KEYS.batch_results("b"), KEYS.batch_order("b")}) == 3
    assert KEYS.rate_limit("k", "rpm") != KEYS.rate_limit("k", "tpm")
    # A producer without a key never meets a key's stored answers.
    assert KEYS.direct_answer(None, "key_1:m") != KEYS.direct_answer("key_1", "m")


def test_namespaces_keep_meshes_apart_and_empty_is_ragmesh() -> None:
    assert RedisKeys("").prefix == RedisKeys(DEFAULT_NAMESPACE).prefix == "ragmesh:"
    assert RedisKeys("").job("j") == "ragmesh:job:j"
    assert RedisKeys("a").job("j") != RedisKeys("b").job("j")


def test_scan_patterns_match_a_family_and_nothing_else() -> None:
    assert KEYS.pattern("job") == "t1:job:*"
    assert KEYS.pattern("batch") == "t1:batch:*"  # never batches:*
    assert KEYS.pattern("collections") == "t1:collections"  # one key, never collections-epoch
    assert KEYS.pattern("apikeys") == "t1:apikeys"


SETTINGS: dict[str, Any] = {
    "RAGMESH_PREPROCESS_": PreprocessSettings,
    "RAGMESH_RETRIEVAL_": RetrievalSettings,
    "RAGMESH_POSTPROCESS_": PostprocessSettings,
}


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_each_family_documents_its_ttl_and_the_setting_holding_it(family: Any) -> None:
    assert family.ttl and family.type and family.writer and family.pattern.startswith("{ns}:" + family.name)
    for env in family.ttl_settings:
        prefix = next(p for p in SETTINGS if env.startswith(p))
        field = env.removeprefix(prefix).lower()
        assert field in SETTINGS[prefix].model_fields, f"{family.name}: {env} is no setting"


def test_constant_ttls_are_the_ones_the_stores_apply() -> None:
    by_name = {f.name: f for f in FAMILIES}
    assert by_name["job"].ttl_seconds == JOB_FINISHED_TTL == jobs.FINISHED_TTL == 7 * 24 * 3600
    assert by_name["direct"].ttl_seconds == DIRECT_ANSWER_TTL == direct.ANSWER_TTL == 24 * 3600
    # The cache TTLs are settings; their defaults are what the table says.
    assert RetrievalSettings.model_fields["embedding_cache_ttl"].default == 30 * 24 * 3600
    assert RetrievalSettings.model_fields["result_cache_ttl"].default == 3600
    assert PostprocessSettings.model_fields["response_cache_ttl"].default == 24 * 3600


def test_no_service_builds_a_redis_key_by_hand() -> None:
    """Keys come from RedisKeys: no `f"{namespace or 'ragmesh'}:..."` left in a service (queue
    and exchange names, which join with a dot, are AMQP's, not Redis keys)."""
    by_hand = re.compile(r"""(namespace|ns) or ["']ragmesh["']\}:|\{ns\}:""")
    root = Path(__file__).resolve().parents[2]
    for source in [*(root / "services").glob("*/src/**/*.py"), *(root / "libs").glob("*/src/**/*.py")]:
        if source.name != "redis_keys.py":
            assert not by_hand.search(source.read_text()), source

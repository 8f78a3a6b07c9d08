"""Every Redis key the mesh uses, built in one place: the key schema.

All keys start with the mesh's namespace (`RAGMESH_NAMESPACE`, "ragmesh" when empty) and a
colon, then a family name that no other family starts with (the unit test
`tests/unit/test_redis_keys.py` holds every family to that, so two families can never
build the same key). The keys are byte-identical to those the services built by hand
before this module, so data already in Redis and the Lua scripts (which receive their keys
as KEYS[...] from here) keep working.

Each family below says its Redis type, who writes it, and how long Redis keeps it (its TTL,
or what deletes it when it has none). `FAMILIES` lists the same for tools and tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# The namespace's stand-in when RAGMESH_NAMESPACE is empty.
DEFAULT_NAMESPACE = "ragmesh"

# --- TTLs that are constants (the others are settings, named in FAMILIES) ------------------

# An ingestion job is kept this long (seconds) after it finished; queued and running jobs
# have no TTL (retrieval finishes or fails every job it takes).
JOB_FINISHED_TTL = 7 * 24 * 3600
# A direct-protocol answer is kept this long (seconds) for a redelivered request to be
# answered from it rather than run again.
DIRECT_ANSWER_TTL = 24 * 3600


@dataclass(frozen=True)
class Family:
    """One family of keys: what `FAMILIES` documents (and the key-schema test checks)."""

    name: str  # the segment after the namespace that every key of the family starts with
    pattern: str  # the whole key, with {placeholders}
    type: str  # Redis type
    writer: str  # the service (module) that writes it
    ttl: str  # how long Redis keeps it: seconds, a setting, or what deletes it
    ttl_seconds: int | None = None  # the constant TTL, when it is one
    ttl_settings: tuple[str, ...] = ()  # the settings (env vars) the TTL is made of, when it is


FAMILIES: tuple[Family, ...] = (
    Family(
        "apikey", "{ns}:apikey:{sha256 of the secret}", "string (JSON)", "preprocess.keys",
        "none: kept until the key is revoked (the record stays, marked revoked)",
    ),
    Family("apikeys", "{ns}:apikeys", "hash: key id -> sha256", "preprocess.keys", "none: the key index"),
    Family(
        "ratelimit", "{ns}:ratelimit:{key id}:rpm|tpm", "hash {level, ts}", "preprocess.keys (Lua)",
        "2 x the limit window, renewed by each write (PEXPIRE in the script)",
        ttl_settings=("RAGMESH_PREPROCESS_RATE_LIMIT_WINDOW",),
    ),
    Family(
        "inflight", "{ns}:inflight:{key id}", "sorted set: request id -> admitted at (ms)", "preprocess.keys (Lua)",
        "the longest a request may run (request timeout + stream idle timeout), renewed by each admission;"
        " older entries are dropped",
        ttl_settings=("RAGMESH_PREPROCESS_REQUEST_TIMEOUT", "RAGMESH_PREPROCESS_STREAM_IDLE_TIMEOUT"),
    ),
    Family(
        "job", "{ns}:job:{job id}", "hash", "preprocess.ingest, retrieval.ingestion",
        "7 days once finished; none while queued or running", ttl_seconds=JOB_FINISHED_TTL,
    ),
    Family(
        "file", "{ns}:file:{file id}", "string (JSON)", "preprocess.files",
        "none: the sweeper deletes it after the retention (files:expiry)",
        ttl_settings=("RAGMESH_PREPROCESS_BATCH_RETENTION",),
    ),
    Family(
        "files", "{ns}:files:all | files:owner:{key id} | files:expiry", "sorted set", "preprocess.files",
        "none: entries leave with their file",
    ),
    Family(
        "batch", "{ns}:batch:{batch id}:state|results|order", "hash, hash, string (JSON)", "preprocess.batches",
        "none: the sweeper deletes a finished batch after the retention (batches:retired)",
        ttl_settings=("RAGMESH_PREPROCESS_BATCH_RETENTION",),
    ),
    Family(
        "batches", "{ns}:batches:all | batches:owner:{key id} | batches:active | batches:retired", "sorted set",
        "preprocess.batches", "none: entries leave with their batch",
    ),
    Family(
        "direct", "{ns}:direct:{key id or ''}:{message id}", "string (the answer)", "preprocess.batches.direct",
        "24 hours", ttl_seconds=DIRECT_ANSWER_TTL,
    ),
    Family(
        "collection-acl", "{ns}:collection-acl:{collection name}", "hash {owner, shared}", "preprocess.ownership",
        "none: deleted with the collection",
    ),
    Family(
        "collections", "{ns}:collections", "hash: name -> {id, created, reranker}", "retrieval.store",
        "none: the collection registry",
    ),
    Family(
        "collections-epoch", "{ns}:collections-epoch", "string (unix time)", "retrieval.store",
        "none: its absence tells a replica that Redis lost the registry",
    ),
    Family(
        "collection-version", "{ns}:collection-version:{collection id}", "string (counter)", "retrieval.store",
        "none: deleted with the collection",
    ),
    Family(
        "emb", "{ns}:emb:{embedding model}:{sha256 of the text}", "string (float32 vector)", "retrieval.embedder",
        "the embedding cache TTL (30 days by default)", ttl_settings=("RAGMESH_RETRIEVAL_EMBEDDING_CACHE_TTL",),
    ),
    Family(
        "search", "{ns}:search:{collection id}:{version}:{mode}:{top_k}:{sha256 of the query}", "string (JSON)",
        "retrieval.search", "the result cache TTL (1 hour by default)",
        ttl_settings=("RAGMESH_RETRIEVAL_RESULT_CACHE_TTL",),
    ),
    Family(
        "response", "{ns}:response:{sha256 of the cache key}", "string (JSON)", "postprocess.cache",
        "the response cache TTL (24 hours by default)", ttl_settings=("RAGMESH_POSTPROCESS_RESPONSE_CACHE_TTL",),
    ),
)  # fmt: skip


class RedisKeys:
    """The keys of one namespace. Builders take the variable parts, already checked by their
    callers (ids and names the mesh made or validated: none holds a colon where the family's
    next segment must start)."""

    def __init__(self, namespace: str = "") -> None:
        self.namespace = namespace or DEFAULT_NAMESPACE
        self.prefix = f"{self.namespace}:"

    def pattern(self, family: str) -> str:
        """A SCAN MATCH pattern for every key of `family` in this namespace."""
        return f"{self.prefix}{family}:*" if family in _OPEN_FAMILIES else f"{self.prefix}{family}"

    # --- API keys and limits (preprocess.keys) ------------------------------------------

    def api_key(self, digest: str) -> str:
        """A key's record, under the SHA-256 of its secret (Redis never holds the secret)."""
        return f"{self.prefix}apikey:{digest}"

    @property
    def api_key_index(self) -> str:
        """Key id -> SHA-256 of its secret (the admin API's listing and revocation)."""
        return f"{self.prefix}apikeys"

    def rate_limit(self, key_id: str, limit: Literal["rpm", "tpm"]) -> str:
        """A key's token bucket for requests (`rpm`) or tokens (`tpm`)."""
        return f"{self.prefix}ratelimit:{key_id}:{limit}"

    def in_flight(self, key_id: str) -> str:
        """A key's requests in flight (sorted set: request id -> admitted at, ms)."""
        return f"{self.prefix}inflight:{key_id}"

    # --- ingestion jobs (ragmesh.jobs) -------------------------------------------------------

    def job(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}"

    # --- files (preprocess.files) ----------------------------------------------------------

    def file(self, file_id: str) -> str:
        """A file's description (its contents are on disk)."""
        return f"{self.prefix}file:{file_id}"

    def files_index(self, owner: str | None) -> str:
        """Files by creation time: one owner's (an API key id), or everyone's (None)."""
        return f"{self.prefix}files:" + (f"owner:{owner}" if owner is not None else "all")

    @property
    def files_expiry(self) -> str:
        """Files by expiry time (the sweeper's work list)."""
        return f"{self.prefix}files:expiry"

    # --- batches (preprocess.batches) -------------------------------------------------------

    def batch_state(self, batch_id: str) -> str:
        return f"{self.prefix}batch:{batch_id}:state"

    def batch_results(self, batch_id: str) -> str:
        return f"{self.prefix}batch:{batch_id}:results"

    def batch_order(self, batch_id: str) -> str:
        return f"{self.prefix}batch:{batch_id}:order"

    def batches_index(self, owner: str | None) -> str:
        """Batches by creation time: one owner's (an API key id), or everyone's (None)."""
        return f"{self.prefix}batches:" + (f"owner:{owner}" if owner is not None else "all")

    @property
    def batches_active(self) -> str:
        """Batches not finished, by expiry time."""
        return f"{self.prefix}batches:active"

    @property
    def batches_retired(self) -> str:
        """Finished batches, by deletion time."""
        return f"{self.prefix}batches:retired"

    # --- the direct queue protocol (preprocess.batches.direct) -------------------------------

    def direct_answer(self, owner: str | None, message_id: str) -> str:
        """A direct request's stored answer; the producer's key id is part of it, so another key
        sending the same message_id never gets this answer."""
        return f"{self.prefix}direct:{owner or ''}:{message_id}"

    # --- collections (preprocess.ownership, retrieval.store) -------------------------------

    def collection_acl(self, name: str) -> str:
        """A collection's owner and sharing."""
        return f"{self.prefix}collection-acl:{name}"

    @property
    def collections(self) -> str:
        """The registry every retrieval replica shares: name -> {id, created, reranker}."""
        return f"{self.prefix}collections"

    @property
    def collections_epoch(self) -> str:
        """Set once with the registry; its absence means Redis lost the registry (a flush)."""
        return f"{self.prefix}collections-epoch"

    def collection_version(self, collection_id: str) -> str:
        """A collection's change counter (orders changes across replicas, keys the result cache)."""
        return f"{self.prefix}collection-version:{collection_id}"

    # --- caches -------------------------------------------------------------------------------

    def embedding_prefix(self, model: str) -> str:
        """What every cached embedding of `model` starts with (the embedder appends the digest)."""
        return f"{self.prefix}emb:{model}:"

    def embedding(self, model: str, text_digest: str) -> str:
        """A cached embedding: the vector of the text whose SHA-256 is `text_digest`."""
        return self.embedding_prefix(model) + text_digest

    def search_result(self, collection_id: str, version: int | None, mode: str, top_k: int, query_digest: str) -> str:
        """A cached search result: new documents move a collection to a new version, so to new keys."""
        return f"{self.prefix}search:{collection_id}:{version}:{mode}:{top_k}:{query_digest}"

    def response(self, cache_key_digest: str) -> str:
        """A cached answer, under the SHA-256 of the cache key preprocess computed."""
        return f"{self.prefix}response:{cache_key_digest}"


# Families whose keys go on past their name (the others are one key each).
_OPEN_FAMILIES = frozenset(f.name for f in FAMILIES if f.pattern != "{ns}:" + f.name)

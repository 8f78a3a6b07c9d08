"""Wiring of the retrieval service: Redis, the embedding model, collections, ingestion."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import faiss
import grpc
from redis.exceptions import RedisError

from ragmesh.jobs import JobStore
from ragmesh.logs import setup_logging
from ragmesh.redis_client import redis_client
from ragmesh.service import GrpcService, run_grpc_service
from ragmesh.tracing import setup_tracing
from ragmesh.v1 import retrieval_pb2, retrieval_pb2_grpc
from retrieval.catchup import CatchUp
from retrieval.embedder import Embedder
from retrieval.index import Meta
from retrieval.ingestion import Ingestion
from retrieval.rerankers import Rerankers
from retrieval.search import Searcher
from retrieval.sentence_rerank import SentenceReranker
from retrieval.servicer import RetrievalServicer
from retrieval.settings import RetrievalSettings
from retrieval.store import CollectionStore

log = logging.getLogger(__name__)

SERVICE_NAME = retrieval_pb2.DESCRIPTOR.services_by_name["Retrieval"].full_name


async def _now() -> None:
    return None


@asynccontextmanager
async def retrieval_service(settings: RetrievalSettings) -> AsyncIterator[GrpcService]:
    """Load the model and the collections, start consuming; yield the servicer."""
    faiss.omp_set_num_threads(1)
    redis = redis_client(settings)
    embedder = Embedder(settings, redis)
    store = CollectionStore(settings, redis)
    builtin = [SentenceReranker(settings.sentence_reranker, embedder)] if settings.sentence_reranker else []
    rerankers = Rerankers.from_specs(settings.rerankers, builtin)
    _, loaded, _ = await asyncio.gather(
        asyncio.to_thread(embedder.load), asyncio.to_thread(store.load_all), asyncio.to_thread(rerankers.load)
    )
    check_dimensions(loaded, embedder)
    await store.reconcile()
    store.start_background()
    catch_up = CatchUp(settings, store) if settings.peers else None
    # Missing collections: this replica serves only once it has copied them from a peer.
    missing = await catch_up.missing() if catch_up is not None else []
    if missing:
        log.info("catching up from peers before serving", extra={"collections": [w.name for w in missing]})
    ingestion = Ingestion(settings, store, embedder, JobStore(redis, settings.namespace), catch_up)
    ingestion.start()
    servicer = RetrievalServicer(settings, store, Searcher(settings, embedder, redis), embedder, ingestion, rerankers)

    def register(server: grpc.aio.Server) -> None:
        retrieval_pb2_grpc.add_RetrievalServicer_to_server(servicer, server)

    async def ready() -> dict[str, str]:
        try:
            await redis.ping()
            redis_state = "ok"
        except (RedisError, OSError) as exc:
            redis_state = f"unavailable: {exc}"
        return {"model": "ok", "redis": redis_state, "rabbitmq": ingestion.state()}

    try:
        yield GrpcService(
            register=register,
            service_names=[SERVICE_NAME],
            ready_check=ready,
            until_serving=ingestion.wait_caught_up if missing else _now,
            on_drain=[ingestion.stop_consuming],
        )
    finally:
        await ingestion.close()
        await store.close()
        rerankers.close()
        embedder.close()
        await redis.aclose()


def check_dimensions(collections: list[Meta], embedder: Embedder) -> None:
    """Refuse to start when the embedding model's vectors do not fit the collections on disk.

    A model changed under existing collections (RAGMESH_RETRIEVAL_EMBEDDING_MODEL_PATH) would
    fail every search and ingestion of theirs; said once at start, with what to do.
    """
    wrong = sorted(
        f"{m.name} ({m.dimensions})" for m in collections if m.dimensions and m.dimensions != embedder.dimensions
    )
    if wrong:
        raise RuntimeError(
            f"the embedding model {embedder.model_name} makes {embedder.dimensions}-dimension vectors but these "
            f"collections hold others: {', '.join(wrong)}. Start with the model they were built with "
            "(RAGMESH_RETRIEVAL_EMBEDDING_MODEL_PATH), or delete and re-ingest them."
        )


def serve(settings: RetrievalSettings) -> None:
    """Run the retrieval service until SIGTERM."""
    setup_logging("retrieval", settings.log_level)
    setup_tracing("retrieval")
    run_grpc_service(settings, lambda: retrieval_service(settings))

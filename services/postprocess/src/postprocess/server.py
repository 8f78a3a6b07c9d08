"""Wiring of the postprocess service."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
from redis.exceptions import RedisError

from postprocess.cache import ResponseCache
from postprocess.servicer import PostprocessServicer
from postprocess.session import GuardConfig
from postprocess.settings import PostprocessSettings
from ragmesh.logs import setup_logging
from ragmesh.redis_client import redis_client
from ragmesh.service import GrpcService, run_grpc_service
from ragmesh.tracing import setup_tracing
from ragmesh.v1 import postprocess_pb2, postprocess_pb2_grpc

SERVICE_NAME = postprocess_pb2.DESCRIPTOR.services_by_name["Postprocess"].full_name


def guard_config(settings: PostprocessSettings) -> GuardConfig:
    return GuardConfig(
        pii=tuple(settings.pii_redaction),
        blocklist=tuple(settings.blocklist),
        stop_on_block=settings.blocklist_action == "stop",
    )


@asynccontextmanager
async def postprocess_service(settings: PostprocessSettings) -> AsyncIterator[GrpcService]:
    """Yield the servicer to register; the response cache lives in Redis."""
    redis = redis_client(settings)
    servicer = PostprocessServicer(
        guard_config(settings), ResponseCache(redis, settings.namespace, settings.response_cache_ttl)
    )

    def register(server: grpc.aio.Server) -> None:
        postprocess_pb2_grpc.add_PostprocessServicer_to_server(servicer, server)

    async def ready() -> dict[str, str]:
        try:
            await redis.ping()
        except (RedisError, OSError) as exc:
            return {"redis": f"unavailable: {exc}"}
        return {"redis": "ok"}

    try:
        yield GrpcService(register=register, service_names=[SERVICE_NAME], ready_check=ready)
    finally:
        await redis.aclose()


def serve(settings: PostprocessSettings) -> None:
    """Run the postprocess service until SIGTERM."""
    setup_logging("postprocess", settings.log_level)
    setup_tracing("postprocess")
    run_grpc_service(settings, lambda: postprocess_service(settings))

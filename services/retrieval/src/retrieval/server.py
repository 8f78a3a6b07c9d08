"""Wiring of the retrieval service."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc

from ragmesh.logs import setup_logging
from ragmesh.service import GrpcService, run_grpc_service
from ragmesh.v1 import retrieval_pb2, retrieval_pb2_grpc
from retrieval.servicer import RetrievalServicer
from retrieval.settings import RetrievalSettings

SERVICE_NAME = retrieval_pb2.DESCRIPTOR.services_by_name["Retrieval"].full_name


@asynccontextmanager
async def retrieval_service(settings: RetrievalSettings) -> AsyncIterator[GrpcService]:
    def register(server: grpc.aio.Server) -> None:
        retrieval_pb2_grpc.add_RetrievalServicer_to_server(RetrievalServicer(), server)

    yield GrpcService(register=register, service_names=[SERVICE_NAME])


def serve(settings: RetrievalSettings) -> None:
    """Run the retrieval service until SIGTERM."""
    setup_logging("retrieval", settings.log_level)
    run_grpc_service(settings, lambda: retrieval_service(settings))

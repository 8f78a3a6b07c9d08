"""Wiring of the postprocess service."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc

from postprocess.servicer import PostprocessServicer
from postprocess.settings import PostprocessSettings
from ragmesh.logs import setup_logging
from ragmesh.service import GrpcService, run_grpc_service
from ragmesh.v1 import postprocess_pb2, postprocess_pb2_grpc

SERVICE_NAME = postprocess_pb2.DESCRIPTOR.services_by_name["Postprocess"].full_name


@asynccontextmanager
async def postprocess_service(settings: PostprocessSettings) -> AsyncIterator[GrpcService]:
    """Yield the servicer to register (postprocess holds no resources yet)."""

    def register(server: grpc.aio.Server) -> None:
        postprocess_pb2_grpc.add_PostprocessServicer_to_server(PostprocessServicer(), server)

    yield GrpcService(register=register, service_names=[SERVICE_NAME])


def serve(settings: PostprocessSettings) -> None:
    """Run the postprocess service until SIGTERM."""
    setup_logging("postprocess", settings.log_level)
    run_grpc_service(settings, lambda: postprocess_service(settings))

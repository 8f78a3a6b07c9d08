"""Wiring of the inference service: engine, servicer, gRPC server and ops endpoints."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc

from inference.engine import LlamaCppEngine
from inference.servicer import InferenceServicer
from inference.settings import InferenceSettings
from ragmesh.logs import setup_logging
from ragmesh.service import GrpcService, run_grpc_service
from ragmesh.v1 import inference_pb2, inference_pb2_grpc

SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name


@asynccontextmanager
async def inference_service(settings: InferenceSettings) -> AsyncIterator[GrpcService]:
    """Load the engine and yield the servicer to register; unload on exit."""
    engine = LlamaCppEngine(settings)
    await asyncio.to_thread(engine.load)

    def register(server: grpc.aio.Server) -> None:
        inference_pb2_grpc.add_InferenceServicer_to_server(InferenceServicer(engine), server)

    async def ready() -> dict[str, str]:
        return {"engine": "ok"}

    try:
        yield GrpcService(register=register, service_names=[SERVICE_NAME], ready_check=ready)
    finally:
        await engine.aclose()


def serve(settings: InferenceSettings) -> None:
    """Run the inference service until SIGTERM."""
    setup_logging("inference", settings.log_level)
    run_grpc_service(settings, lambda: inference_service(settings))

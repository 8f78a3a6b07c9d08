"""Wiring of the inference service: backends file, engines, router, gRPC server, reload on SIGHUP."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

import grpc

from inference.config import ConfigError, EmbeddedBackend, load_backends
from inference.engine import LlamaCppEngine
from inference.router import Registry, Router
from inference.servicer import InferenceServicer
from inference.settings import InferenceSettings
from ragmesh.errors import RagmeshError, invalid_request
from ragmesh.logs import setup_logging
from ragmesh.service import GrpcService, run_grpc_service
from ragmesh.tracing import setup_tracing
from ragmesh.v1 import inference_pb2, inference_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name


@asynccontextmanager
async def inference_service(settings: InferenceSettings) -> AsyncIterator[GrpcService]:
    """Load the backends file and the engines it names; yield the servicer to register."""
    config = load_backends(settings.backends_file)  # ConfigError: the service does not start
    embedded: LlamaCppEngine | None = None
    if any(isinstance(b, EmbeddedBackend) for b in config.backends):
        embedded = LlamaCppEngine(settings)
        await asyncio.to_thread(embedded.load)
    router = Router(embedded)
    await router.load(config)
    reload_lock = asyncio.Lock()

    async def reload() -> Registry:
        """Read the file again and build its engines; a file that cannot be used (its syntax, a
        missing key variable, an unreadable key file) is refused with a 400 naming the problem,
        logged, and the running configuration stays."""
        async with reload_lock:
            try:
                return await router.load(load_backends(settings.backends_file))
            except (ConfigError, RagmeshError) as exc:
                reason = exc.message if isinstance(exc, RagmeshError) else str(exc)
                log.error("backends file refused; keeping the running configuration", extra={"error": reason})
                raise invalid_request(reason, param="backends_file") from None
            except Exception:
                log.exception("backends reload failed; keeping the running configuration")
                raise

    reloads: set[asyncio.Task[None]] = set()

    def on_sighup() -> None:
        async def run() -> None:
            with suppress(Exception):  # reload() logged why
                await reload()
                log.info("backends reloaded on SIGHUP")

        task = asyncio.get_running_loop().create_task(run())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, on_sighup)

    def register(server: grpc.aio.Server) -> None:
        inference_pb2_grpc.add_InferenceServicer_to_server(InferenceServicer(router, embedded, reload), server)

    async def ready() -> dict[str, str]:
        return {"engines": "ok"}

    try:
        yield GrpcService(register=register, service_names=[SERVICE_NAME], ready_check=ready)
    finally:
        loop.remove_signal_handler(signal.SIGHUP)
        await router.aclose()
        if embedded is not None:
            await embedded.aclose()


def serve(settings: InferenceSettings) -> None:
    """Run the inference service until SIGTERM."""
    setup_logging("inference", settings.log_level)
    setup_tracing("inference")
    run_grpc_service(settings, lambda: inference_service(settings))

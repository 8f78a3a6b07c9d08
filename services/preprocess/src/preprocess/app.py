"""The preprocess HTTP app: serving objects built at start, the API routers, middleware, health, metrics."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import APIRouter, FastAPI
from opentelemetry.trace import SpanKind
from redis.exceptions import RedisError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from preprocess.api import admin, batches, chat, embeddings, health, models, ollama, rerank, retrieval
from preprocess.api.auth import AuthMiddleware
from preprocess.api.errors import install_error_handlers
from preprocess.api.forward import forwarding_router
from preprocess.api.index import index_router
from preprocess.api.listener import Listener
from preprocess.api.openapi import DocumentedApp
from preprocess.batches import Batches
from preprocess.clients import MeshClients
from preprocess.documents import Chunker, check_chunk_length, load_tokenizer
from preprocess.files import FileStore
from preprocess.ingest import IngestPublisher
from preprocess.keys import KeyStore
from preprocess.ownership import CollectionAccess
from preprocess.queue_depth import QueueDepthMonitor
from preprocess.reranking import Reranking
from preprocess.serving.admin import AdminServing
from preprocess.serving.chat import ChatServing
from preprocess.serving.embeddings import EmbeddingsServing
from preprocess.serving.forward import ForwardServing
from preprocess.serving.models import ModelsServing
from preprocess.serving.operations import OperationRunner
from preprocess.serving.rerank import RerankServing
from preprocess.serving.retrieval import RetrievalServing
from preprocess.serving.services import Serving
from preprocess.settings import PreprocessSettings
from ragmesh.amqp import Topology
from ragmesh.context import REQUEST_ID_HEADER, accept_request_id, request_id_var
from ragmesh.grpc_client import use_service_token
from ragmesh.jobs import JobStore
from ragmesh.logs import setup_logging
from ragmesh.ops import ops_routes
from ragmesh.redis_client import redis_client
from ragmesh.service import drain_hooks, run_http
from ragmesh.tracing import set_error, setup_tracing, span

# One router per API family of the public listener, in the order /openapi.json lists them
# (then GET / and the forwarding catch-all). The admin router is on the admin listener.
PUBLIC_ROUTERS: list[APIRouter] = [
    chat.router,
    embeddings.router,
    models.router,
    retrieval.router,
    rerank.router,
    batches.router,
    ollama.router,
    health.router,
]


class RequestIdMiddleware:
    """Takes X-Request-ID from the gateway (or makes one), logs with it, echoes it back."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        rid = accept_request_id(headers.get(REQUEST_ID_HEADER))
        token = request_id_var.set(rid)
        name = f"{scope['method']} {scope['path']}"
        with span(
            name, SpanKind.SERVER, parent=headers, attributes={"http.request.method": scope["method"]}
        ) as current:

            async def send_with_id(message: Message) -> None:
                if message["type"] == "http.response.start":
                    message.setdefault("headers", [])
                    message["headers"] = [*message["headers"], (REQUEST_ID_HEADER.encode(), rid.encode())]
                    if current is not None:
                        current.set_attribute("http.response.status_code", message["status"])
                        if message["status"] >= 400:
                            set_error(current, f"HTTP {message['status']}")
                await send(message)

            try:
                await self.app(scope, receive, send_with_id)
            finally:
                request_id_var.reset(token)


def create_app(settings: PreprocessSettings) -> FastAPI:
    """Build the app; the serving objects and gRPC channels are made in its lifespan."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        use_service_token(settings.service_token)  # every gRPC call to the peers carries it
        clients = MeshClients.connect(settings)
        redis = redis_client(settings)
        jobs = JobStore(redis, settings.namespace)
        tokenizer = await asyncio.to_thread(load_tokenizer, settings.chunk_tokenizer_path())
        check_chunk_length(tokenizer, settings.chunk_tokenizer_path(), settings.chunk_tokens)
        chunker = Chunker(tokenizer, settings.chunk_tokens, settings.chunk_overlap)
        publisher = IngestPublisher(settings, chunker, jobs)
        keys = KeyStore(redis, settings.namespace, settings.rate_limit_window)
        forward = ForwardServing(clients, settings)
        reranking = Reranking(clients, settings)
        access = CollectionAccess(redis, settings.namespace)
        serving = Serving(
            settings=settings,
            clients=clients,
            keys=keys,
            chat=ChatServing(clients, settings, keys, reranking, access),
            embeddings=EmbeddingsServing(clients, settings, forward),
            retrieval=RetrievalServing(clients, settings, publisher, jobs, reranking, access),
            models=ModelsServing(clients, settings.model_aliases),
            admin=AdminServing(clients, keys),
            forward=forward,
            rerank=RerankServing(reranking, settings, keys, forward),
        )
        batches = Batches(
            settings,
            redis,
            FileStore(redis, Path(settings.files_dir), settings.namespace, settings.batch_retention),
            OperationRunner(serving),
        )
        batches.start_workers()
        queue_depth = QueueDepthMonitor(
            settings.amqp_url, Topology(settings.namespace), settings.queue_metrics_interval
        )
        queue_depth.start()
        app.state.serving = serving
        app.state.batches = batches
        admin_app.state.serving = serving
        admin_listener = Listener(admin_app, settings.admin_host, settings.admin_port, settings.shutdown_grace)
        if settings.admin_port:
            await admin_listener.start()

        async def ready() -> dict[str, str]:
            deps = await clients.ready()
            try:
                await redis.ping()
                deps["redis"] = "ok"
            except (RedisError, OSError) as exc:
                deps["redis"] = f"unavailable: {exc}"
            deps["rabbitmq"] = await publisher.check()
            deps.update(batches.ready())
            return deps

        app.state.ready_check = ready
        # SIGTERM: batch workers take no new lines at once; the HTTP side then lets
        # requests in flight (open SSE streams too) finish within the grace.
        drain_hooks(app).append(batches.stop_consuming)
        try:
            yield
        finally:
            await admin_listener.close()
            await queue_depth.close()
            await batches.close()
            await publisher.close()
            await clients.close()
            await redis.aclose()

    app = DocumentedApp(
        title="ragmesh",
        description="OpenAI-compatible LLM + RAG gateway. Errors are OpenAI's envelope.",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    install_error_handlers(app)
    for router in PUBLIC_ROUTERS:
        app.include_router(router)
    forwarding = forwarding_router([*PUBLIC_ROUTERS, admin.router])
    app.include_router(index_router([*PUBLIC_ROUTERS, forwarding]))
    app.include_router(forwarding)  # last: the mesh's own routes win
    app.router.routes.extend(ops_routes(health=False))
    admin_app = create_admin_app()

    def current_keys() -> KeyStore | None:
        serving = getattr(app.state, "serving", None)
        return serving.keys if isinstance(serving, Serving) else None

    # Outermost last: the request id is set before authentication logs anything.
    app.add_middleware(
        AuthMiddleware,
        keys=current_keys,
        enabled=settings.auth == "on",
        models_public=settings.models_public,
        max_in_flight=settings.key_max_in_flight,
        in_flight_ttl=settings.request_timeout + settings.stream_idle_timeout,
    )
    app.add_middleware(RequestIdMiddleware)
    return app


def create_admin_app() -> FastAPI:
    """The admin API alone, for the admin listener (the public app's lifespan gives it its state)."""
    app = DocumentedApp(
        title="ragmesh admin",
        description="Admin API (admin key as a bearer token). Not exposed by the public gateway.",
        docs_url=None,
        redoc_url=None,
    )
    install_error_handlers(app)
    app.include_router(admin.router)
    app.include_router(health.router)
    app.add_middleware(RequestIdMiddleware)
    return app


def serve(settings: PreprocessSettings) -> None:
    """Run the preprocess service until SIGTERM."""
    setup_logging("preprocess", settings.log_level)
    setup_tracing("preprocess")
    run_http(create_app(settings), settings)

"""The preprocess HTTP app: OpenAI-compatible routes, health, metrics."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

import orjson
import redis.asyncio as aioredis
from fastapi import FastAPI, Request
from opentelemetry.trace import SpanKind
from redis.exceptions import RedisError
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from preprocess.auth import AuthMiddleware, api_key_of, check_model_allowed, owner_of
from preprocess.batches import Batches
from preprocess.chat import ChatCompletions
from preprocess.clients import MeshClients
from preprocess.documents import Chunker, load_tokenizer
from preprocess.files import FileStore
from preprocess.http_errors import install_error_handlers
from preprocess.http_io import read_json, read_upload
from preprocess.ingest import IngestPublisher
from preprocess.keys import KeyStore
from preprocess.models import check_admin, model_detail, models_page, reload_inference_backends
from preprocess.queue_depth import QueueDepthMonitor
from preprocess.retrieval_api import RetrievalApi, runner
from preprocess.settings import PreprocessSettings
from ragmesh.amqp import Topology
from ragmesh.context import REQUEST_ID_HEADER, accept_request_id, request_id_var
from ragmesh.errors import invalid_request
from ragmesh.jobs import JobStore
from ragmesh.logs import setup_logging
from ragmesh.ops import ops_routes
from ragmesh.service import drain_hooks, run_http
from ragmesh.tracing import set_error, setup_tracing, span


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


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def create_app(settings: PreprocessSettings) -> FastAPI:
    """Build the app; gRPC channels open in its lifespan."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        clients = MeshClients.connect(settings)
        redis = aioredis.Redis.from_url(settings.redis_url, socket_timeout=2, socket_connect_timeout=2)
        jobs = JobStore(redis, settings.namespace)
        tokenizer = await asyncio.to_thread(load_tokenizer, settings.tokenizer_path or None)
        chunker = Chunker(tokenizer, settings.chunk_tokens, settings.chunk_overlap)
        publisher = IngestPublisher(settings, chunker, jobs)
        keys = KeyStore(redis, settings.namespace, settings.rate_limit_window)
        chat = ChatCompletions(clients, settings, keys)
        retrieval = RetrievalApi(clients, settings, publisher, jobs)
        batches = Batches(
            settings,
            redis,
            FileStore(redis, Path(settings.files_dir), settings.namespace, settings.batch_retention),
            runner(settings, chat, retrieval),
        )
        batches.start_workers()
        queue_depth = QueueDepthMonitor(
            settings.amqp_url, Topology(settings.namespace), settings.queue_metrics_interval
        )
        queue_depth.start()
        app.state.clients = clients
        app.state.chat = chat
        app.state.retrieval = retrieval
        app.state.batches = batches
        app.state.keys = keys

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
            await queue_depth.close()
            await batches.close()
            await publisher.close()
            await clients.close()
            await redis.aclose()

    app = FastAPI(title="ragmesh", lifespan=lifespan, docs_url=None, redoc_url=None)
    install_error_handlers(app)
    app.router.routes.extend(ops_routes())

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        chat: ChatCompletions = request.app.state.chat
        return await chat.create(request)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        chat: ChatCompletions = request.app.state.chat
        return await chat.create_completion(request)

    @app.post("/v1/admin/keys")
    async def create_key(request: Request) -> Response:
        check_admin(request, settings.admin_key)
        payload = await body(request)
        if not isinstance(payload, dict):
            raise invalid_request("The request body must be a JSON object.")
        secret, key = await request.app.state.keys.create(
            str(payload.get("name", "")),
            expires_in=_int_or_none(payload.get("expires_in"), "expires_in"),
            models=[str(m) for m in payload.get("models") or []],
            rpm=_int_or_none(payload.get("rpm"), "rpm") or 0,
            tpm=_int_or_none(payload.get("tpm"), "tpm") or 0,
        )
        return _json({**key.public(), "key": secret}, 201)

    @app.get("/v1/admin/keys")
    async def list_keys(request: Request) -> Response:
        check_admin(request, settings.admin_key)
        return _json({"object": "list", "data": [k.public() for k in await request.app.state.keys.list()]})

    @app.delete("/v1/admin/keys/{key_id}")
    async def revoke_key(key_id: str, request: Request) -> Response:
        check_admin(request, settings.admin_key)
        return _json((await request.app.state.keys.revoke(key_id)).public())

    @app.post("/v1/admin/reload-backends")
    async def reload_backends(request: Request) -> Response:
        check_admin(request, settings.admin_key)
        return _json(await reload_inference_backends(request.app.state.clients))

    @app.get("/v1/models")
    async def list_models(request: Request) -> Response:
        page = await models_page(request.app.state.clients, settings.model_aliases)
        key = api_key_of(request)
        if key is not None and key.models:
            page["data"] = [card for card in page["data"] if card["id"] in key.models]
        return _json(page)

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str, request: Request) -> Response:
        check_model_allowed(api_key_of(request), model)
        return _json(await model_detail(request.app.state.clients, settings.model_aliases, model))

    def api(request: Request) -> RetrievalApi:
        return request.app.state.retrieval  # type: ignore[no-any-return]

    async def body(request: Request) -> Any:
        return await read_json(request, settings.max_body_bytes)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        payload = await body(request)
        if isinstance(payload, dict):
            check_model_allowed(api_key_of(request), str(payload.get("model", "")))
        return _json(await api(request).embeddings(payload))

    @app.post("/v1/collections")
    async def create_collection(request: Request) -> Response:
        return _json(await api(request).create_collection(await body(request)), 201)

    @app.get("/v1/collections")
    async def list_collections(request: Request) -> Response:
        return _json(await api(request).list_collections())

    @app.get("/v1/collections/{name}")
    async def get_collection(name: str, request: Request) -> Response:
        return _json(await api(request).get_collection(name))

    @app.delete("/v1/collections/{name}")
    async def delete_collection(name: str, request: Request) -> Response:
        return _json(await api(request).delete_collection(name))

    @app.post("/v1/collections/{name}/documents")
    async def add_documents(name: str, request: Request) -> Response:
        return _json(await api(request).add_documents(name, await body(request)), 202)

    @app.get("/v1/jobs/{job_id}")
    async def get_job(job_id: str, request: Request) -> Response:
        return _json(await api(request).get_job(job_id))

    def batch_api(request: Request) -> Batches:
        return request.app.state.batches  # type: ignore[no-any-return]

    @app.post("/v1/files")
    async def upload_file(request: Request) -> Response:
        data, filename, purpose = await read_upload(request, settings.max_file_bytes)
        return _json(await batch_api(request).upload(data, filename, purpose, owner_of(request)))

    @app.get("/v1/files")
    async def list_files(
        request: Request,
        purpose: str | None = None,
        after: str | None = None,
        limit: int = 10_000,
        order: Literal["asc", "desc"] = "desc",
    ) -> Response:
        files = batch_api(request).files
        limit = max(1, min(limit, 10_000))
        return _json(await files.list(owner_of(request), purpose=purpose, after=after, limit=limit, order=order))

    @app.get("/v1/files/{file_id}")
    async def get_file(file_id: str, request: Request) -> Response:
        return _json(await batch_api(request).files.info(file_id, owner_of(request)))

    @app.delete("/v1/files/{file_id}")
    async def delete_file(file_id: str, request: Request) -> Response:
        return _json(await batch_api(request).files.delete(file_id, owner_of(request)))

    @app.get("/v1/files/{file_id}/content")
    async def file_content(file_id: str, request: Request) -> Response:
        content = await batch_api(request).files.content(file_id, owner_of(request))
        return Response(content, media_type="application/jsonl")

    @app.post("/v1/batches")
    async def create_batch(request: Request) -> Response:
        return _json(await batch_api(request).create(await body(request), owner_of(request)))

    @app.get("/v1/batches")
    async def list_batches(request: Request, limit: int = 20, after: str | None = None) -> Response:
        return _json(await batch_api(request).list(max(1, min(limit, 100)), after, owner_of(request)))

    @app.get("/v1/batches/{batch_id}")
    async def get_batch(batch_id: str, request: Request) -> Response:
        return _json(await batch_api(request).get(batch_id, owner_of(request)))

    @app.post("/v1/batches/{batch_id}/cancel")
    async def cancel_batch(batch_id: str, request: Request) -> Response:
        return _json(await batch_api(request).cancel(batch_id, owner_of(request)))

    @app.post("/v1/search")
    async def search(request: Request) -> Response:
        return _json(await api(request).search(await body(request)))

    # Outermost last: the request id is set before authentication logs anything.
    app.add_middleware(
        AuthMiddleware,
        keys=lambda: getattr(app.state, "keys", None),
        enabled=settings.auth == "on",
        models_public=settings.models_public,
    )
    app.add_middleware(RequestIdMiddleware)
    return app


def _int_or_none(value: Any, param: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid_request(f"'{param}' must be an integer.", param=param)
    return value


def serve(settings: PreprocessSettings) -> None:
    """Run the preprocess service until SIGTERM."""
    setup_logging("preprocess", settings.log_level)
    setup_tracing("preprocess")
    run_http(create_app(settings), settings)

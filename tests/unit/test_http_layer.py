"""The preprocess HTTP layer's shape: a serving layer without HTTP, one operations table, a described API."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
from fastapi.routing import APIRoute
from openapi_spec_validator import validate

from preprocess.app import PUBLIC_ROUTERS, create_admin_app, create_app
from preprocess.batches.lines import parse_batch_lines
from preprocess.serving import operations
from preprocess.settings import PreprocessSettings
from ragmesh.errors import RagmeshError

SERVING_MODULES = [
    "preprocess.serving.services",
    "preprocess.serving.operations",
    "preprocess.serving.chat",
    "preprocess.serving.embeddings",
    "preprocess.serving.retrieval",
    "preprocess.serving.models",
    "preprocess.serving.admin",
    "preprocess.serving.schemas",
    "preprocess.serving.sse",
    "preprocess.batches",
]


def test_the_serving_layer_imports_nothing_from_starlette_or_fastapi() -> None:
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in SERVING_MODULES)
        + "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('starlette', 'fastapi'))\n"
        + "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"serving imports HTTP modules: {out.stdout.strip()}"


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return create_app(PreprocessSettings()).openapi()


def test_openapi_document_is_valid_openapi_3(document: dict[str, Any]) -> None:
    assert document["openapi"].startswith("3.")
    validate(document)


def _public_routes() -> list[APIRoute]:
    return [r for router in [*PUBLIC_ROUTERS] for r in router.routes if isinstance(r, APIRoute) and r.include_in_schema]


def _resolve(document: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if ref is None:
        return schema
    resolved: dict[str, Any] = document["components"]["schemas"][ref.rsplit("/", 1)[1]]
    return resolved


def _check_operations(document: dict[str, Any]) -> int:
    """Every operation of `document`: a response schema, a request body where one is sent, OpenAI errors."""
    checked = 0
    for path, operations_ in document["paths"].items():
        for method, op in operations_.items():
            where = f"{method.upper()} {path}"
            ok = next(str(s) for s in op["responses"] if str(s).startswith("2"))
            content = op["responses"][ok]["content"]
            assert content, f"{where}: no response schema"
            for media in content.values():
                schema = _resolve(document, media["schema"])
                assert schema.get("properties") or schema.get("type"), f"{where}: empty response schema"
            if method in ("post", "put", "patch") and not path.endswith("/cancel") and "reload" not in path:
                body = op.get("requestBody", {}).get("content", {})
                assert body, f"{where}: no request body schema"
                for media in body.values():
                    schema = _resolve(document, media["schema"])
                    assert schema.get("properties") or schema.get("type"), f"{where}: empty body"
            assert "422" not in op["responses"], f"{where}: FastAPI's 422 is never answered"
            for status, response in op["responses"].items():
                # Readiness answers 503 with its own report (what load balancers and probes read).
                if str(status).startswith(("4", "5")) and not path.startswith("/v1/health/"):
                    (schema,) = [m["schema"] for m in response["content"].values()]
                    assert "error" in _resolve(document, schema)["properties"], f"{where} {status}"
            checked += 1
    return checked


def test_every_route_documents_its_request_and_response_bodies(document: dict[str, Any]) -> None:
    for route in _public_routes():
        for method in (route.methods or set()) - {"HEAD"}:
            assert method.lower() in document["paths"][route.path_format], f"{method} {route.path} undocumented"
    assert _check_operations(document) >= 25
    assert {"/", "/v1/{path}"} <= set(document["paths"])
    assert not any(p.startswith("/v1/admin") for p in document["paths"])  # not on the public listener


def test_the_admin_listener_is_documented_the_same_way() -> None:
    admin_document = create_admin_app().openapi()
    validate(admin_document)
    assert _check_operations(admin_document) >= 8
    assert "/v1/admin/backends/{name}/key" in admin_document["paths"]


def test_chat_body_in_the_document_is_the_request_model(document: dict[str, Any]) -> None:
    op = document["paths"]["/v1/chat/completions"]["post"]
    body = _resolve(document, op["requestBody"]["content"]["application/json"]["schema"])
    assert {"model", "messages", "stream", "rag"} <= set(body["properties"])
    assert "text/event-stream" in op["responses"]["200"]["content"]


def test_one_table_gives_routes_batch_urls_and_the_runner() -> None:
    paths = {r.path for r in _public_routes()}
    assert set(operations.OPERATIONS) <= paths
    assert tuple(operations.OPERATIONS) == operations.BATCH_URLS
    line = b'{"custom_id": "a", "method": "POST", "url": "/v1/rerank-nope", "body": {}}'
    with pytest.raises(RagmeshError) as refused:
        parse_batch_lines(line, 10)
    assert all(url in refused.value.message for url in operations.BATCH_URLS)
    assert operations.generates("/v1/chat/completions") and not operations.generates("/v1/embeddings")


def test_the_table_validates_with_the_same_rules_as_http() -> None:
    settings = PreprocessSettings(max_n=2)
    chat = {"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 3}
    with pytest.raises(RagmeshError) as too_many:
        operations.operation("/v1/chat/completions").parse(chat, settings)
    assert too_many.value.param == "n"
    with pytest.raises(RagmeshError) as unknown:
        operations.operation("/v1/nope")
    assert unknown.value.param == "url"


def test_readiness_names_the_dependency_down_never_its_error_text() -> None:
    from starlette.applications import Starlette
    from starlette.testclient import TestClient

    from ragmesh.ops import ops_routes

    app = Starlette(routes=ops_routes())

    async def check() -> dict[str, str]:
        return {"redis": "unavailable: Error 111 connecting to 10.0.0.5:6379. Connection refused.", "inference": "ok"}

    app.state.ready_check = check
    reply = TestClient(app).get("/v1/health/ready")
    assert reply.status_code == 503
    assert reply.json() == {"status": "not ready", "dependencies": {"redis": "down", "inference": "ok"}}

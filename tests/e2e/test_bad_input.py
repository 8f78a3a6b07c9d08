"""Bad input through nginx: an OpenAI error body with the right status, and the next request still works."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from .conftest import MODEL

pytestmark = pytest.mark.e2e

GOOD = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
JSON = {"Content-Type": "application/json"}
LONG = "word " * 3000  # over the 2048-token context of a slot

CASES: list[tuple[str, bytes, dict[str, str], int, str | None]] = [
    ("malformed json", b'{"model": "x", "messages": [', JSON, 400, None),
    ("missing messages", b'{"model": "%s"}' % MODEL.encode(), JSON, 400, "messages"),
    ("messages not a list", b'{"model": "%s", "messages": "hi"}' % MODEL.encode(), JSON, 400, "messages"),
    (
        "unknown role",
        b'{"model": "%s", "messages": [{"role": "robot", "content": "x"}]}' % MODEL.encode(),
        JSON,
        400,
        "messages[0].role",
    ),
    (
        "non-string content",
        b'{"model": "%s", "messages": [{"role": "user", "content": 42}]}' % MODEL.encode(),
        JSON,
        400,
        "messages[0].content",
    ),
    ("unknown model", b'{"model": "gpt-404", "messages": [{"role": "user", "content": "x"}]}', JSON, 404, "model"),
    (
        "max_tokens below 1",
        b'{"model": "%s", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}' % MODEL.encode(),
        JSON,
        400,
        "max_tokens",
    ),
    (
        "prompt over the context",
        b'{"model": "%s", "messages": [{"role": "user", "content": "%s"}]}' % (MODEL.encode(), LONG.encode()),
        JSON,
        400,
        "messages",
    ),
    (
        "prompt over the context, streamed",
        b'{"model": "%s", "stream": true, "messages": [{"role": "user", "content": "%s"}]}'
        % (MODEL.encode(), LONG.encode()),
        JSON,
        400,
        "messages",
    ),
    ("wrong content type", b"model=x&messages=y", {"Content-Type": "application/x-www-form-urlencoded"}, 415, None),
    ("body over the limit", b'{"model": "x", "pad": "' + b"a" * (1024 * 1024 + 10) + b'"}', JSON, 413, None),
    ("empty body", b"", JSON, 400, None),
    (
        "json_schema that is not a JSON Schema",
        b'{"model": "%s", "messages": [{"role": "user", "content": "x"}], "max_tokens": 8, "response_format": '
        b'{"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "required": "name"}}}}'
        % MODEL.encode(),
        JSON,
        400,
        "response_format.json_schema.schema",
    ),
    ("json array body", b"[1, 2]", JSON, 400, None),
]


@pytest.mark.parametrize(("name", "body", "headers", "status", "param"), CASES, ids=[c[0] for c in CASES])
def test_bad_request_gets_openai_error_and_mesh_keeps_serving(
    http: httpx.Client, name: str, body: bytes, headers: dict[str, str], status: int, param: str | None
) -> None:
    reply = http.post("/v1/chat/completions", content=body, headers=headers)
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"].startswith("application/json")
    error = reply.json()
    assert set(error) == {"error"}
    assert set(error["error"]) == {"message", "type", "param", "code", "request_id"}
    assert error["error"]["request_id"] == reply.headers["x-request-id"]
    assert error["error"]["message"]
    if param is not None:
        assert error["error"]["param"] == param
    assert "x-request-id" in reply.headers

    after = http.post("/v1/chat/completions", json=GOOD)
    assert after.status_code == 200, after.text
    assert after.json()["choices"][0]["finish_reason"] == "length"


def test_unknown_route_and_method_are_openai_errors(http: httpx.Client) -> None:
    missing = http.get("/v1/nothing-here")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "invalid_request_error"
    wrong = http.get("/v1/chat/completions")
    assert wrong.status_code == 405 and "error" in wrong.json()


def test_error_bodies_match_the_openai_schema(http: httpx.Client, validate: Any) -> None:
    for _, body, headers, status, _ in CASES:
        reply = http.post("/v1/chat/completions", content=body, headers=headers)
        assert reply.status_code == status
        validate(reply.json(), "ErrorResponse")

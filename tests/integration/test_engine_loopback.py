"""llama.cpp's own HTTP server inside the embedded engine: loopback only, and keyed with the engine's key.

xllamacpp starts llama.cpp's HTTP server on a loopback port (the engine reaches the chat
template and the tokenizer through it). Anyone else on the machine who finds the port must
not generate past the mesh's keys, guardrails and slot scheduling through it.
"""

from __future__ import annotations

from urllib.parse import urlparse

import httpx
import pytest

from inference.engine import LlamaCppEngine

# What the engine calls there, and what an intruder would want: generation and slot control.
GUARDED = [
    ("POST", "/tokenize", {"content": "hello"}),
    ("POST", "/apply-template", {"messages": [{"role": "user", "content": "hi"}]}),
    ("POST", "/completion", {"prompt": "Hello", "n_predict": 4}),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}),
    ("GET", "/slots", None),
    ("GET", "/props", None),
]


@pytest.fixture
def loopback(engine: LlamaCppEngine) -> str:
    address = str(engine._server.listening_address)  # the server the engine started
    url = urlparse(address)
    # A loopback port, or a Unix socket (xllamacpp listens on one when its hostname ends in .sock).
    assert url.scheme == "unix" or (url.hostname or "").startswith("127."), f"llama.cpp listens on {address}"
    return address


def client_of(address: str) -> httpx.AsyncClient:
    """A client with no key of its own to the engine's llama.cpp server."""
    url = urlparse(address)
    if url.scheme == "unix":
        return httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=url.path), base_url="http://llama", timeout=30)
    return httpx.AsyncClient(base_url=address, timeout=30)


@pytest.mark.parametrize(("method", "path", "body"), GUARDED)
async def test_an_unkeyed_or_wrongly_keyed_call_is_refused(
    loopback: str, method: str, path: str, body: dict[str, object] | None
) -> None:
    async with client_of(loopback) as client:
        for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": "Bearer"}):
            reply = await client.request(method, path, json=body, headers=headers)
            assert reply.status_code == 401, f"{method} {path} with {headers or 'no key'}: {reply.status_code}"


async def test_the_engines_own_key_is_let_in(engine: LlamaCppEngine, loopback: str) -> None:
    """The 401s above come from the key check, not from a closed port: the engine's client gets through."""
    http = engine._http  # the engine's client, holding its key
    assert http is not None
    reply = await http.post("/tokenize", json={"content": "hello"})
    assert reply.status_code == 200 and reply.json()["tokens"]

"""llama.cpp's own HTTP server inside the embedded engine: no TCP port, an owner-only Unix socket,
and keyed with the engine's key.

xllamacpp always starts llama.cpp's HTTP server (the engine reaches the chat template and the
tokenizer through it when it cannot count in process, and token pieces always). It listens on a
Unix socket in a folder only the service's user can enter, so nothing on the network, nor another
user of the machine, can reach it; and with the engine's own key, not even a process of the same
user can generate past the mesh's keys, guardrails and slot scheduling through it.
"""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest

from inference.engine import LlamaCppEngine
from inference.settings import InferenceSettings

# What the engine calls there, and what an intruder would want: generation and slot control.
GUARDED = [
    ("POST", "/tokenize", {"content": "hello"}),
    ("POST", "/apply-template", {"messages": [{"role": "user", "content": "hi"}]}),
    ("POST", "/completion", {"prompt": "Hello", "n_predict": 4}),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}),
    ("GET", "/slots", None),
    ("GET", "/props", None),
]
LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's st column


def listening_tcp_sockets() -> set[str]:
    """The inodes of this process's listening TCP sockets (v4 and v6)."""
    ours = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed meanwhile (the listdir's own fd)
            continue
        if target.startswith("socket:["):
            ours.add(target[len("socket:[") : -1])
    listening = set()
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == LISTEN and fields[9] in ours:
                listening.add(fields[9])
    return listening


@pytest.fixture
def socket_path(engine: LlamaCppEngine) -> str:
    address = str(engine._server.listening_address)  # the server the engine started
    url = urlparse(address)
    assert url.scheme == "unix", f"llama.cpp listens on {address}, not on a Unix socket"
    return url.path


def client_of(path: str) -> httpx.AsyncClient:
    """A client with no key of its own to the engine's llama.cpp server."""
    return httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=path), base_url="http://llama", timeout=30)


async def test_loading_an_engine_opens_no_tcp_port_and_closing_removes_its_socket() -> None:
    """This process listens on the same TCP ports before and after an engine loads (the old engine
    added llama.cpp's loopback port); its socket's folder is gone once the engine is closed."""
    before = listening_tcp_sockets()
    engine = LlamaCppEngine(InferenceSettings(n_parallel=1, n_ctx=512, n_threads=1, n_threads_batch=1))
    await asyncio.to_thread(engine.load)
    try:
        assert listening_tcp_sockets() == before, f"the engine listens on {engine._server.listening_address}"
        path = urlparse(str(engine._server.listening_address)).path
        assert stat.S_ISSOCK(os.stat(path).st_mode)
    finally:
        await engine.aclose()
    assert not await asyncio.to_thread(os.path.exists, os.path.dirname(path))


def test_the_socket_is_in_a_folder_only_its_owner_enters(socket_path: str) -> None:
    folder = os.stat(os.path.dirname(socket_path))
    assert folder.st_uid == os.getuid()
    assert stat.S_IMODE(folder.st_mode) == 0o700, oct(folder.st_mode)
    socket = os.stat(socket_path)
    assert stat.S_ISSOCK(socket.st_mode) and socket.st_uid == os.getuid()
    assert not socket.st_mode & (stat.S_IWGRP | stat.S_IWOTH), oct(socket.st_mode)  # connecting needs write


@pytest.mark.parametrize(("method", "path", "body"), GUARDED)
async def test_an_unkeyed_or_wrongly_keyed_call_is_refused(
    socket_path: str, method: str, path: str, body: dict[str, object] | None
) -> None:
    async with client_of(socket_path) as client:
        for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": "Bearer"}):
            reply = await client.request(method, path, json=body, headers=headers)
            assert reply.status_code == 401, f"{method} {path} with {headers or 'no key'}: {reply.status_code}"


async def test_the_engines_own_key_is_let_in(engine: LlamaCppEngine, socket_path: str) -> None:
    """The 401s above come from the key check, not from a closed socket: the engine's client gets through."""
    http = engine._http  # the engine's client, holding its key
    assert http is not None
    reply = await http.post("/tokenize", json={"content": "hello"})
    assert reply.status_code == 200 and reply.json()["tokens"]

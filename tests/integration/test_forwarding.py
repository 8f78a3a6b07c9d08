"""Forwarding and backend keys over real gRPC: preprocess's serving layer -> inference -> scripted upstreams.

The inference service runs in this process with upstream backends only (no
model is loaded); the upstreams are tests/scripted_upstream.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from inference.server import inference_service
from inference.settings import InferenceSettings
from preprocess.serving.forward import ForwardServing
from preprocess.settings import PreprocessSettings
from ragmesh.errors import ErrorKind, RagmeshError
from ragmesh.v1 import inference_pb2, inference_pb2_grpc

from ..scripted_upstream import SPEECH, ScriptedUpstreams
from .conftest import serving


@pytest.fixture(scope="module")
def upstreams() -> Iterator[ScriptedUpstreams]:
    with ScriptedUpstreams() as running:
        yield running


@pytest.fixture
async def stub(
    upstreams: ScriptedUpstreams, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[inference_pb2_grpc.InferenceAsyncStub]:
    monkeypatch.setenv("FWD_QA_KEY", "qa-configured")
    backends = tmp_path / "backends.yaml"
    backends.write_text(
        f"""
backends:
  - name: qa
    type: openai
    base_url: {upstreams.url("qa")}
    api_key_env: FWD_QA_KEY
    models: [fwd/qa, {{id: fwd/embed, capabilities: [embedding]}}]
    paths: ["/audio/*"]
"""
    )
    settings = InferenceSettings(backends_file=str(backends))
    async with inference_service(settings) as service, serving(service.register) as channel:
        yield inference_pb2_grpc.InferenceStub(channel)


def forwarder(stub: Any) -> ForwardServing:
    return ForwardServing(SimpleNamespace(inference=stub), PreprocessSettings())  # type: ignore[arg-type]


async def test_a_binary_answer_comes_through_grpc_as_it_was(stub: Any, upstreams: ScriptedUpstreams) -> None:
    answer = await forwarder(stub).open("POST", "/audio/speech", "", b'{"input": "hi"}', "application/json", "", "")
    assert answer.status == 200 and answer.headers == {"content-type": "audio/wav"}
    assert b"".join([part async for part in answer.body]) == SPEECH
    assert upstreams.last("qa", "/audio/speech").headers["authorization"] == "Bearer qa-configured"


async def test_events_come_through_as_they_were_sent(stub: Any) -> None:
    answer = await forwarder(stub).open(
        "POST", "/responses", "", b'{"model": "fwd/qa"}', "application/json", "", "fwd/qa"
    )
    body = b"".join([part async for part in answer.body])
    assert answer.headers["content-type"].startswith("text/event-stream")
    assert body.count(b"event: response.output_text.delta") == 4 and body.endswith(b"\n\n")


async def test_no_owner_is_not_found(stub: Any) -> None:
    for model, path in (("", "/images/generations"), ("fwd/nope", "/responses")):
        with pytest.raises(RagmeshError) as missing:
            await forwarder(stub).open("POST", path, "", b"{}", "application/json", "", model)
        assert missing.value.kind is ErrorKind.NOT_FOUND


async def test_upstream_embeddings_keep_what_the_client_sent(stub: Any, upstreams: ScriptedUpstreams) -> None:
    sent = {"model": "fwd/embed", "input": ["a"], "input_type": "query", "truncate": "END", "dimensions": 5}
    answer = await forwarder(stub).json("/embeddings", "fwd/embed", sent)
    assert len(answer["data"][0]["embedding"]) == 5
    assert upstreams.last("qa", "/embeddings").body == sent


async def test_backend_keys_over_grpc_are_set_listed_and_reverted(stub: Any, upstreams: ScriptedUpstreams) -> None:
    async def used() -> str:
        answer = await forwarder(stub).open("POST", "/audio/speech", "", b"{}", "application/json", "", "")
        _ = [part async for part in answer.body]
        return upstreams.last("qa", "/audio/speech").headers["authorization"]

    info = await stub.SetBackendKey(inference_pb2.SetBackendKeyRequest(backend="qa", api_key="at-run-time"))
    assert info.key_source == "runtime" and "at-run-time" not in str(info)
    assert await used() == "Bearer at-run-time"
    listed = await stub.ListBackends(inference_pb2.ListBackendsRequest())
    assert "at-run-time" not in str(listed) and listed.backends[0].paths == ["/audio/*"]
    assert (await stub.RevertBackendKey(inference_pb2.RevertBackendKeyRequest(backend="qa"))).key_source == (
        "env:FWD_QA_KEY"
    )
    assert await used() == "Bearer qa-configured"
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await stub.SetBackendKey(inference_pb2.SetBackendKeyRequest(backend="nope", api_key="x"))
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND

"""Issue #16's pieces on their own: content parts, context messages, capabilities, shaping, forwarding, keys."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from inference.config import BackendsFile, UpstreamBackend, parse_backends
from inference.llamacpp_body import GROUNDING
from inference.llamacpp_body import chat_messages as engine_messages
from inference.router import Router
from inference.upstream import guessed_capabilities, openai_request, stated_capabilities
from preprocess.protocol import parse_chat_request
from preprocess.serving.chat import normalized_messages, to_generate_request
from preprocess.serving.forward import model_of, upstream_error
from ragmesh.errors import ErrorKind, RagmeshError
from ragmesh.v1 import inference_pb2

IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}


def chat(*messages: dict[str, Any], **kw: Any) -> Any:
    return parse_chat_request({"model": "m", "messages": list(messages)}, max_n=8, **kw)


def test_image_parts_pass_validation_and_are_listed_for_the_capability_check() -> None:
    req = chat({"role": "user", "content": [{"type": "text", "text": "what is this?"}, IMAGE]})
    assert req.content_parts() == [("image_url", "messages[0].content[1]")]
    assert req.text_of(0) == "what is this?"  # RAG and the embedded prompt get text only
    generate = to_generate_request(req)
    assert [(p.type, p.param) for p in generate.content_parts] == [("image_url", "messages[0].content[1]")]


def test_a_data_url_over_the_limit_is_refused_naming_it() -> None:
    with pytest.raises(RagmeshError) as refused:
        chat({"role": "user", "content": [IMAGE]}, max_data_url_bytes=10)
    assert refused.value.param == "messages[0].content[0].image_url.url"
    assert refused.value.code == "data_url_too_large"


def test_context_messages_become_a_grounding_block_for_the_embedded_engine_only() -> None:
    req = chat(
        {"role": "system", "content": "Answer in French."},
        {"role": "context", "content": "Tides come from the moon."},
        {"role": "user", "content": "What causes tides?"},
    )
    typed = normalized_messages(req)
    assert [m.role for m in typed] == ["system", "context", "user"]  # as sent, for every engine
    upstream = openai_request(to_generate_request(req), "qa")["messages"]
    assert upstream[1] == {"role": "context", "content": "Tides come from the moon."}
    folded = engine_messages(typed)
    assert [m["role"] for m in folded] == ["system", "user"]
    assert folded[0]["content"].startswith("Answer in French.\n\n" + GROUNDING)
    assert folded[0]["content"].endswith("Context:\n\nTides come from the moon.")
    alone = engine_messages(
        normalized_messages(chat({"role": "context", "content": "doc"}, {"role": "user", "content": "q"}))
    )
    assert alone[0]["role"] == "system" and alone[0]["content"].endswith("doc")


def test_image_parts_reach_an_upstream_as_sent_and_the_embedded_engine_as_text() -> None:
    parts = [{"type": "text", "text": "what is this?"}, IMAGE]
    req = chat({"role": "user", "content": parts})
    typed = normalized_messages(req)
    assert typed[0].content == "what is this?"
    assert openai_request(to_generate_request(req), "vlm")["messages"][0]["content"] == parts


def test_what_a_model_does_comes_from_the_endpoint_or_its_id() -> None:
    assert stated_capabilities({"id": "x", "capabilities": ["chat", "vision"]}) == ["chat", "vision"]
    assert stated_capabilities({"id": "x", "type": "embedding"}) == ["embedding"]
    assert stated_capabilities({"id": "x", "owned_by": "vllm"}) is None
    assert guessed_capabilities("nvidia/nv-embedqa-e5-v5") == ["embedding"]
    assert guessed_capabilities("nvidia/llama-3.2-nv-rerankqa-1b-v2") == ["rerank"]
    assert guessed_capabilities("meta/llama-3.1-8b-instruct") == ["chat"]


def test_the_backends_file_takes_capabilities_paths_and_payload_rules() -> None:
    config = parse_backends(
        """
backends:
  - name: nim
    type: openai
    base_url: http://nim/v1
    capabilities: [chat]
    models: [a, {id: b, capabilities: [chat, vision]}]
    paths: ["/ranking", "/audio/*"]
    payload: {stream: false, drop: [stream_options], force: {top_k: 1}}
"""
    )
    nim = config.backends[0]
    assert isinstance(nim, UpstreamBackend)
    assert nim.model_ids() == ["a", "b"]
    assert nim.listed_capabilities("a") == ["chat"] and nim.listed_capabilities("b") == ["chat", "vision"]
    assert nim.takes_path("/audio/speech") and not nim.takes_path("/images/generations")
    assert not nim.payload.stream and nim.payload.force == {"top_k": 1}


def test_model_of_reads_a_json_body_only() -> None:
    assert model_of(b'{"model": "m", "x": 1}', "application/json; charset=utf-8") == "m"
    assert model_of(b'{"model": 3}', "application/json") == ""
    assert model_of(b"model=m", "application/x-www-form-urlencoded") == ""
    assert model_of(b"{not json", "application/json") == ""


def test_an_upstream_error_keeps_a_client_mistake_a_client_mistake() -> None:
    assert upstream_error(400, {"error": {"message": "bad", "param": "input"}}, "m").param == "input"
    assert upstream_error(400, {}, "m").kind is ErrorKind.INVALID_REQUEST
    assert upstream_error(500, {"detail": "boom"}, "m").kind is ErrorKind.BAD_GATEWAY


# --- the router with a real HTTP upstream -------------------------------------------------------


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[str, list[web.Request], list[Any]]]:
    """A loopback upstream: records requests (and their JSON bodies), answers chat, ranking and audio."""
    seen: list[web.Request] = []
    bodies: list[Any] = []

    async def answer(request: web.Request) -> web.StreamResponse:
        seen.append(request)
        raw = await request.read()
        bodies.append(json.loads(raw) if raw else None)
        if request.path.endswith("/chat/completions"):
            return web.json_response(
                {
                    "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": "whole"}, "finish_reason": "stop"}
                    ],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 1},
                }
            )
        if request.path.endswith("/ranking"):
            return web.json_response({"rankings": [{"index": 0, "logit": 1.0}]})
        response = web.StreamResponse(headers={"Content-Type": "audio/wav", "Set-Cookie": "x=1"})
        await response.prepare(request)
        await response.write(b"RIFF")
        await response.write(b"DATA")
        return response

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield f"http://127.0.0.1:{server.port}/v1", seen, bodies
    finally:
        await server.close()


def config_for(base_url: str, **extra: str) -> BackendsFile:
    lines = "".join(f"    {k}: {v}\n" for k, v in extra.items())
    return parse_backends(
        "backends:\n"
        "  - name: up\n"
        "    type: openai\n"
        f"    base_url: {base_url}\n"
        "    models: [text-model, {id: eye, capabilities: [chat, vision]}, nv-embed]\n"
        '    paths: ["/ranking", "/audio/*"]\n'
        f"{lines}"
    )


def gen(model: str, parts: tuple[tuple[str, str], ...] = ()) -> inference_pb2.GenerateRequest:
    request = inference_pb2.GenerateRequest(model=model, openai_json='{"messages": [{"role": "user", "content": "x"}]}')
    request.chat.SetInParent()
    request.content_parts.extend(inference_pb2.ContentPart(type=t, param=p) for t, p in parts)
    return request


async def drain(router: Router, request: inference_pb2.GenerateRequest) -> list[Any]:
    return [chunk async for chunk in router.generate(request)]


async def test_an_image_goes_only_to_a_model_that_can_see(upstream: Any) -> None:
    base, seen, bodies = upstream
    router = Router(None)
    await router.load(config_for(base, payload="{stream: false, drop: [nvext], force: {temperature: 0.5}}"))
    try:
        with pytest.raises(RagmeshError) as refused:
            await drain(router, gen("text-model", (("image_url", "messages[0].content[1]"),)))
        assert refused.value.param == "messages[0].content[1]" and "`text-model`" in refused.value.message
        with pytest.raises(RagmeshError) as not_chat:
            await drain(router, gen("nv-embed"))
        assert not_chat.value.code == "model_not_supported"
        assert not seen  # neither reached the upstream
        chunks = await drain(router, gen("eye", (("image_url", "messages[0].content[0]"),)))
        assert "".join(c.text for c in chunks) == "whole" and chunks[-1].prompt_tokens == 3
        assert "stream" not in bodies[-1] and bodies[-1]["temperature"] == 0.5  # the no-stream backend
    finally:
        await router.aclose()


async def test_forwarding_picks_the_owner_and_passes_the_answer_through(upstream: Any) -> None:
    base, seen, _ = upstream
    router = Router(None)
    await router.load(config_for(base))
    try:
        by_path = [
            item
            async for item in router.forward(
                inference_pb2.ForwardRequest(
                    method="POST", path="/audio/speech", body=b'{"input": "hi"}', content_type="application/json"
                )
            )
        ]
        assert by_path[0][0] == 200 and by_path[0][1] == {"content-type": "audio/wav"}  # no Set-Cookie
        assert b"".join(data for _, _, data in by_path) == b"RIFFDATA"
        by_model = [
            item
            async for item in router.forward(
                inference_pb2.ForwardRequest(
                    method="POST", path="/anything", model="eye", body=b"{}", content_type="application/json"
                )
            )
        ]
        assert by_model[0][0] == 200 and seen[-1].path == "/v1/anything"
        for model, path in (("", "/images/generations"), ("nope", "/ranking")):
            with pytest.raises(RagmeshError) as missing:
                router.forward_target(model, path)
            assert missing.value.kind is ErrorKind.NOT_FOUND
    finally:
        await router.aclose()


async def test_a_key_set_at_run_time_is_used_survives_a_reload_and_reverts(
    upstream: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, seen, _ = upstream
    monkeypatch.setenv("UNIT_UP_KEY", "configured")
    router = Router(None)
    await router.load(config_for(base, api_key_env="UNIT_UP_KEY", payload="{stream: false}"))

    async def auth() -> str:
        await drain(router, gen("text-model"))
        return str(seen[-1].headers["Authorization"])

    try:
        assert await auth() == "Bearer configured"
        info = router.set_key("up", "runtime-secret")
        assert info.key_source == "runtime" and "runtime-secret" not in str(info)
        assert await auth() == "Bearer runtime-secret"
        await router.load(config_for(base, api_key_env="UNIT_UP_KEY", payload="{stream: false}"))
        assert await auth() == "Bearer runtime-secret"
        assert router.revert_key("up").key_source == "env:UNIT_UP_KEY"
        assert await auth() == "Bearer configured"
        with pytest.raises(RagmeshError):
            router.set_key("nope", "x")
        assert all("runtime-secret" not in str(b) for b in router.backends())
    finally:
        await router.aclose()

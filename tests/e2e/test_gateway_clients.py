"""What NVIDIA and OpenAI clients send, through nginx, to upstreams written in the tests (issue #16).

One mesh whose backends file names scripted upstreams (tests/scripted_upstream.py):
a vision model, a QA model (that also owns /audio/*), an embedding model, a
reranker owning /ranking, and a backend shaped to take no streams. The
clients are the real ones: langchain-nvidia-ai-endpoints' ChatNVIDIA and
NVIDIAEmbeddings, the openai SDK, and httpx for the forwarded paths.
"""

from __future__ import annotations

import base64
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from langchain_core.messages import ChatMessage, HumanMessage
from langchain_nvidia_ai_endpoints import ChatNVIDIA, NVIDIAEmbeddings
from openapi_spec_validator import validate

from ..scripted_upstream import SPEECH, ScriptedUpstreams
from .conftest import MODEL, Mesh, mesh_env, running_mesh

pytestmark = pytest.mark.e2e

ADMIN_KEY = "admin-" + "k3y" * 6
KEYS = {"vision": "vision-configured-key", "qa": "qa-configured-key", "embedder": "embed-configured-key"}
RUNTIME_KEY = "rotated-" + "s3cr3t" * 5
LOCAL_EMBEDDER = "all-MiniLM-L6-v2"
PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(100)).decode()
TEXT_PART: dict[str, Any] = {"type": "text", "text": "What is in this picture?"}


def backends_file(up: ScriptedUpstreams) -> str:
    return f"""
backends:
  - {{name: embedded, type: embedded}}
  - name: vision
    type: openai
    base_url: {up.url("vision")}
    api_key_env: SCRIPTED_VISION_KEY
    capabilities: [chat, vision]
    models: [scripted/vlm]
  - name: qa
    type: openai
    base_url: {up.url("qa")}
    api_key_env: SCRIPTED_QA_KEY
    models: [scripted/qa]
    paths: ["/audio/*"]
  - name: embedder
    type: openai
    base_url: {up.url("embedder")}
    api_key_env: SCRIPTED_EMBED_KEY
    models: [{{id: scripted/nv-embedqa, capabilities: [embedding]}}]
  - name: ranker
    type: openai
    base_url: {up.url("ranker")}
    models: [scripted/reranker]
    paths: ["/ranking"]
  - name: whole
    type: openai
    base_url: {up.url("whole")}
    models: [scripted/no-stream]
    payload: {{stream: false, drop: [nvext], force: {{temperature: 0.5}}}}
  - name: gone
    type: openai
    base_url: http://127.0.0.1:{up.closed_port}/v1
    models: [scripted/gone]
retry: {{attempts: 2, backoff_base: 0.05, backoff_max: 0.2}}
"""


@pytest.fixture(scope="module")
def upstreams() -> Iterator[ScriptedUpstreams]:
    with ScriptedUpstreams() as running:
        yield running


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, upstreams: ScriptedUpstreams) -> Iterator[Mesh]:
    run_dir = tmp_path_factory.mktemp("clients")
    backends = run_dir / "backends.yaml"
    backends.write_text(backends_file(upstreams))
    env = mesh_env(
        run_dir,
        RAGMESH_INFERENCE_BACKENDS_FILE=str(backends),
        SCRIPTED_VISION_KEY=KEYS["vision"],
        SCRIPTED_QA_KEY=KEYS["qa"],
        SCRIPTED_EMBED_KEY=KEYS["embedder"],
        RAGMESH_PREPROCESS_ADMIN_KEY=ADMIN_KEY,
        RAGMESH_PREPROCESS_MAX_DATA_URL_BYTES="4096",
        RAGMESH_INFERENCE_N_THREADS="1",
        RAGMESH_INFERENCE_N_THREADS_BATCH="1",
    )
    with running_mesh(run_dir, env) as started:
        yield started


def chat_nvidia(mesh: Mesh, model: str, **kw: Any) -> ChatNVIDIA:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "unknown model": these ids are not in NVIDIA's table
        return ChatNVIDIA(base_url=mesh.v1, model=model, api_key="unused", **kw)


def embeddings(mesh: Mesh, model: str, **kw: Any) -> NVIDIAEmbeddings:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return NVIDIAEmbeddings(base_url=mesh.v1, model=model, api_key="unused", **kw)


def admin(mesh: Mesh, method: str, path: str, **kw: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    return httpx.request(method, f"{mesh.admin}/v1/admin{path}", headers=headers, timeout=30, **kw)


# --- multimodal ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url", ["https://example.com/cat.png", f"data:image/png;base64,{PNG}"], ids=["http-url", "base64"]
)
def test_an_image_reaches_a_vision_upstream_unchanged(mesh: Mesh, upstreams: ScriptedUpstreams, url: str) -> None:
    content: list[str | dict[Any, Any]] = [TEXT_PART, {"type": "image_url", "image_url": {"url": url}}]
    reply = chat_nvidia(mesh, "scripted/vlm").invoke([HumanMessage(content=content)])
    assert str(reply.content).strip() == "scripted answer from vision"
    seen = upstreams.last("vision", "/chat/completions")
    assert seen.body["messages"] == [{"role": "user", "content": content}]
    assert seen.headers["authorization"] == f"Bearer {KEYS['vision']}"


@pytest.mark.parametrize("model", [MODEL, "scripted/qa"], ids=["embedded", "text-only-upstream"])
def test_an_image_to_a_text_only_model_is_a_400_naming_model_and_part(mesh: Mesh, model: str) -> None:
    content: list[str | dict[Any, Any]] = [
        TEXT_PART,
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
    ]
    with pytest.raises(Exception, match=r"\[400\]") as refused:
        chat_nvidia(mesh, model).invoke([HumanMessage(content=content)])
    assert f"`{model}`" in str(refused.value) and "image_url" in str(refused.value)
    assert "messages[0].content[1]" in str(refused.value)


def test_a_data_url_over_the_limit_is_refused(mesh: Mesh, upstreams: ScriptedUpstreams) -> None:
    big = f"data:image/png;base64,{'A' * 5000}"  # the mesh here allows 4096 bytes
    before = len(upstreams.seen)
    reply = httpx.post(
        f"{mesh.v1}/chat/completions",
        json={
            "model": "scripted/vlm",
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": big}}]}],
        },
        timeout=30,
    )
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == "messages[0].content[0].image_url.url" and error["code"] == "data_url_too_large"
    assert len(upstreams.seen) == before


# --- context messages ------------------------------------------------------------------------

CONTEXT = (
    "Ocean tides are caused mainly by the gravitational pull of the Moon, and to a lesser degree the Sun, "
    "on the Earth's oceans; most coasts see two high tides a day."
)


def test_a_context_message_reaches_a_qa_upstream_unchanged(mesh: Mesh, upstreams: ScriptedUpstreams) -> None:
    messages = [ChatMessage(role="context", content=CONTEXT), HumanMessage(content="What causes tides?")]
    reply = chat_nvidia(mesh, "scripted/qa").invoke(messages)
    assert str(reply.content).strip() == "scripted answer from qa"
    sent = upstreams.last("qa", "/chat/completions").body["messages"]
    assert sent == [{"role": "context", "content": CONTEXT}, {"role": "user", "content": "What causes tides?"}]


def test_the_embedded_model_answers_a_context_message_with_the_context_in_its_prompt(mesh: Mesh) -> None:
    llm = chat_nvidia(mesh, MODEL, max_tokens=8, temperature=0)
    plain = llm.invoke([HumanMessage(content="What causes tides?")])
    grounded = llm.invoke([ChatMessage(role="context", content=CONTEXT), HumanMessage(content="What causes tides?")])
    assert grounded.content
    assert plain.usage_metadata is not None and grounded.usage_metadata is not None
    plain_tokens = plain.usage_metadata["input_tokens"]
    grounded_tokens = grounded.usage_metadata["input_tokens"]
    # The context (about 35 tokens) and the grounding instruction went into the prompt.
    assert grounded_tokens >= plain_tokens + 35


# --- embeddings ----------------------------------------------------------------------------------


def test_nvidia_embeddings_on_an_upstream_model_get_input_type_as_sent(
    mesh: Mesh, upstreams: ScriptedUpstreams
) -> None:
    client = embeddings(mesh, "scripted/nv-embedqa", truncate="END")
    query = client.embed_query("what moves the sea")
    assert query[0] == 1.0 and query[1] == len("what moves the sea")
    sent = upstreams.last("embedder", "/embeddings")
    assert sent.body["input_type"] == "query" and sent.body["truncate"] == "END"
    assert sent.headers["authorization"] == f"Bearer {KEYS['embedder']}"
    documents = client.embed_documents(["the moon", "pulls the oceans"])
    assert [d[0] for d in documents] == [2.0, 2.0] and [d[1] for d in documents] == [8.0, 16.0]
    assert upstreams.last("embedder", "/embeddings").body["input_type"] == "passage"


def test_openai_embeddings_pass_dimensions_and_encoding_to_the_upstream(
    mesh: Mesh, upstreams: ScriptedUpstreams
) -> None:
    reply = mesh.openai().embeddings.create(model="scripted/nv-embedqa", input=["x"], dimensions=6)
    assert len(reply.data[0].embedding) == 6
    sent = upstreams.last("embedder", "/embeddings").body
    assert sent["dimensions"] == 6 and sent["encoding_format"] == "base64"  # what the SDK sends


def test_nvidia_embeddings_on_the_local_model_honour_truncate(mesh: Mesh) -> None:
    local = embeddings(mesh, LOCAL_EMBEDDER)
    assert len(local.embed_query("what moves the sea")) == 384
    assert len(local.embed_documents(["the moon", "pulls the oceans"])) == 2
    long_text = "the tide comes in and goes out " * 100  # over the model's 256 tokens
    with pytest.raises(Exception, match=r"\[400\]"):
        local.embed_query(long_text)  # truncate NONE: the limit is an error
    end = embeddings(mesh, LOCAL_EMBEDDER, truncate="END")
    start = embeddings(mesh, LOCAL_EMBEDDER, truncate="START")
    # END drops the end: a different ending changes nothing; START drops the start, likewise.
    assert end.embed_query(long_text) == end.embed_query(long_text + " and a different ending")
    assert start.embed_query(long_text) == start.embed_query("a different opening, then " + long_text)
    assert end.embed_query("unique opening words " + long_text) != start.embed_query(
        "unique opening words " + long_text
    )
    assert len(end.embed_documents([long_text, "short"])) == 2


def test_embeddings_with_a_chat_model_are_a_400_naming_the_embedding_model(mesh: Mesh) -> None:
    reply = httpx.post(f"{mesh.v1}/embeddings", json={"model": MODEL, "input": "x"}, timeout=30)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["code"] == "model_not_supported" and LOCAL_EMBEDDER in error["message"]


# --- forwarding ------------------------------------------------------------------------------


def test_a_nim_ranking_request_is_forwarded_to_its_owner(mesh: Mesh, upstreams: ScriptedUpstreams) -> None:
    body = {
        "model": "scripted/reranker",
        "query": {"text": "what moves the sea"},
        "passages": [{"text": "short"}, {"text": "the moon pulls the oceans"}],
    }
    reply = httpx.post(f"{mesh.v1}/ranking", json=body, headers={"X-Request-ID": "rank-1"}, timeout=30)
    assert reply.status_code == 200, reply.text
    assert reply.json()["rankings"][0]["index"] == 1
    assert reply.headers["x-request-id"] == "rank-1"
    seen = upstreams.last("ranker", "/ranking")
    assert seen.body == body and "authorization" not in seen.headers  # this backend has no key


def test_a_streamed_forwarded_path_passes_events_as_they_come(mesh: Mesh, upstreams: ScriptedUpstreams) -> None:
    body = {"model": "scripted/qa", "input": "hello", "stream": True}
    with httpx.stream("POST", f"{mesh.v1}/responses", json=body, timeout=30) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        events = [line for line in reply.iter_lines() if line.startswith("data:")]
    assert len(events) == 5 and '"delta": "forwarded "' in events[0].replace('":"', '": "')
    assert upstreams.last("qa", "/responses").headers["authorization"] == f"Bearer {KEYS['qa']}"


def test_a_binary_answer_is_forwarded_by_path(mesh: Mesh, upstreams: ScriptedUpstreams) -> None:
    reply = httpx.post(f"{mesh.v1}/audio/speech", json={"input": "hi", "voice": "alloy"}, timeout=30)
    assert reply.status_code == 200 and reply.content == SPEECH
    assert reply.headers["content-type"] == "audio/wav"
    assert upstreams.last("qa", "/audio/speech").body == {"input": "hi", "voice": "alloy"}


def test_a_path_no_backend_owns_is_an_openai_404(mesh: Mesh) -> None:
    for reply in (
        httpx.post(f"{mesh.v1}/images/generations", json={"prompt": "a cat"}, timeout=30),
        httpx.post(f"{mesh.v1}/images/generations", json={"model": "no-such-model", "prompt": "x"}, timeout=30),
        httpx.get(f"{mesh.v1}/nothing-here", timeout=30),
    ):
        assert reply.status_code == 404, reply.text
        error = reply.json()["error"]
        assert error["type"] == "invalid_request_error" and error["message"] and error["request_id"]
    assert httpx.get(f"{mesh.v1}/chat/completions", timeout=30).status_code == 405


# --- no-streaming upstreams ---------------------------------------------------------------------


def test_a_no_stream_backend_is_asked_for_whole_answers_and_the_client_still_streams(
    mesh: Mesh, upstreams: ScriptedUpstreams
) -> None:
    stream = mesh.openai().chat.completions.create(
        model="scripted/no-stream",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"nvext": {"top_k": 3}},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "scripted answer from whole" and chunks[-1].usage is not None
    sent = upstreams.last("whole", "/chat/completions").body
    assert "stream" not in sent and "stream_options" not in sent and "nvext" not in sent
    assert sent["temperature"] == 0.5


# --- model cards, index, OpenAPI ----------------------------------------------------------------


def test_model_cards_say_what_each_model_does_and_where_it_runs(mesh: Mesh) -> None:
    cards = {m["id"]: m for m in httpx.get(f"{mesh.v1}/models", timeout=30).json()["data"]}
    assert (cards[MODEL]["capabilities"], cards[MODEL]["backend_type"]) == (["chat", "completion", "tools"], "embedded")
    assert cards[LOCAL_EMBEDDER]["capabilities"] == ["embedding"]
    assert cards["scripted/vlm"]["capabilities"] == ["chat", "vision"]
    assert cards["scripted/vlm"]["backend_type"] == "openai"
    assert cards["scripted/nv-embedqa"]["capabilities"] == ["embedding"]
    assert cards["scripted/reranker"]["capabilities"] == ["rerank"]  # guessed from the id
    # ChatNVIDIA without a model takes the first listed one: the mesh's chat model.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert ChatNVIDIA(base_url=mesh.v1, api_key="unused").model == MODEL


def test_the_root_lists_the_endpoints(mesh: Mesh) -> None:
    index = httpx.get(mesh.gateway + "/", headers={"Accept": "application/json"}, timeout=30).json()
    listed = {(e["method"], e["path"]) for e in index["endpoints"]}
    assert {("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("POST", "/v1/{path}")} <= listed
    assert all(e["description"] for e in index["endpoints"])


def test_openapi_is_valid_and_describes_every_route(mesh: Mesh) -> None:
    document = httpx.get(f"{mesh.gateway}/openapi.json", timeout=30).json()
    validate(document)
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            ok = operation["responses"].get("200") or operation["responses"].get("201") or operation["responses"]["202"]
            assert ok.get("content"), f"{method} {path}"
            if method in ("post", "put") and not path.endswith("/cancel"):
                assert operation.get("requestBody", {}).get("content"), f"{method} {path}"
            assert "422" not in operation["responses"]


# --- backend keys at run time (the admin listener) ------------------------------------------------


def test_a_key_set_at_run_time_is_used_never_shown_and_reverted(mesh: Mesh, upstreams: ScriptedUpstreams) -> None:
    def ask() -> str:
        chat_nvidia(mesh, "scripted/qa").invoke("hi")
        return upstreams.last("qa", "/chat/completions").headers["authorization"]

    assert ask() == f"Bearer {KEYS['qa']}"
    assert httpx.put(f"{mesh.admin}/v1/admin/backends/qa/key", json={"api_key": RUNTIME_KEY}).status_code == 401
    assert httpx.get(f"{mesh.v1}/admin/backends", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).status_code == 404
    set_reply = admin(mesh, "PUT", "/backends/qa/key", json={"api_key": RUNTIME_KEY})
    assert set_reply.status_code == 200, set_reply.text
    assert set_reply.json()["key_source"] == "runtime" and RUNTIME_KEY not in set_reply.text
    assert ask() == f"Bearer {RUNTIME_KEY}"
    listed = admin(mesh, "GET", "/backends")
    assert RUNTIME_KEY not in listed.text and KEYS["qa"] not in listed.text
    backends = {b["name"]: b for b in listed.json()["data"]}
    assert backends["qa"]["circuit"] == "closed" and backends["qa"]["in_flight"] == 0
    assert backends["qa"]["key_source"] == "runtime" and backends["vision"]["key_source"] == "env:SCRIPTED_VISION_KEY"
    reverted = admin(mesh, "DELETE", "/backends/qa/key")
    assert reverted.status_code == 200 and reverted.json()["key_source"] == "env:SCRIPTED_QA_KEY"
    assert ask() == f"Bearer {KEYS['qa']}"
    assert admin(mesh, "PUT", "/backends/nope/key", json={"api_key": "x"}).status_code == 404
    logs = "".join(p.read_text(errors="replace") for p in Path(mesh.run_dir, "logs").glob("*"))
    assert RUNTIME_KEY not in logs
    audit = [line for line in logs.splitlines() if '"ragmesh.audit"' in line]
    assert any('"backend.key.set"' in line and '"qa"' in line for line in audit)
    assert any('"backend.key.revert"' in line for line in audit)


def test_the_admin_view_shows_a_failing_backends_last_error(mesh: Mesh) -> None:
    reply = httpx.post(
        f"{mesh.v1}/chat/completions",
        json={"model": "scripted/gone", "messages": [{"role": "user", "content": "hi"}]},
        timeout=60,
    )
    assert reply.status_code == 503, reply.text
    backends = {b["name"]: b for b in admin(mesh, "GET", "/backends").json()["data"]}
    assert "unreachable" in backends["gone"]["last_error"] and backends["gone"]["last_error_at"] > 0
    assert backends["gone"]["in_flight"] == 0 and backends["vision"]["last_error"] is None
    assert backends["embedded"]["type"] == "embedded" and backends["ranker"]["paths"] == ["/ranking"]

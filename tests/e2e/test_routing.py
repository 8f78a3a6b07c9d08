"""Upstream backends through the gateway: a mesh whose backends file names a real llama.cpp server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from ..upstream_harness import UPSTREAM_KEY, UPSTREAM_MODEL, FaultProxy, backends_yaml, llama_upstream
from .conftest import MODEL, Mesh, mesh_env, running_mesh

pytestmark = pytest.mark.e2e

ADMIN_KEY = "admin-test-key"


@pytest.fixture(scope="module")
def proxy() -> Iterator[FaultProxy]:
    with llama_upstream() as upstream, FaultProxy(upstream.url) as running:
        yield running


@pytest.fixture(scope="module")
def routed_mesh(tmp_path_factory: pytest.TempPathFactory, proxy: FaultProxy) -> Iterator[tuple[Mesh, Path]]:
    run_dir = tmp_path_factory.mktemp("routed")
    backends = run_dir / "backends.yaml"
    backends.write_text(backends_yaml(proxy.url))
    env = mesh_env(
        run_dir,
        RAGMESH_INFERENCE_BACKENDS_FILE=str(backends),
        TEST_UPSTREAM_KEY=UPSTREAM_KEY,
        RAGMESH_PREPROCESS_ADMIN_KEY=ADMIN_KEY,
        RAGMESH_PREPROCESS_STREAM_IDLE_TIMEOUT="3",
        RAGMESH_INFERENCE_N_THREADS="1",
        RAGMESH_INFERENCE_N_THREADS_BATCH="1",
    )
    with running_mesh(run_dir, env) as started:
        yield started, backends


@pytest.fixture
def mesh(routed_mesh: tuple[Mesh, Path], proxy: FaultProxy) -> Mesh:
    proxy.faults.fail.clear()
    proxy.faults.garbage = False
    proxy.faults.drop_after_events = None
    proxy.faults.stall_after_events = None
    return routed_mesh[0]


def test_models_merge_local_and_upstream_with_slash_ids(mesh: Mesh) -> None:
    client = mesh.openai()
    owners = {m.id: m.owned_by for m in client.models.list()}
    assert owners[MODEL] == "embedded" and owners[UPSTREAM_MODEL] == "llama-upstream"
    assert client.models.retrieve(UPSTREAM_MODEL).id == UPSTREAM_MODEL


def test_keys_stay_server_side(mesh: Mesh, proxy: FaultProxy) -> None:
    client = openai.OpenAI(base_url=mesh.v1, api_key="client-key-must-not-leak", max_retries=0)
    reply = client.chat.completions.create(
        model=UPSTREAM_MODEL, messages=[{"role": "user", "content": "Say hi."}], max_tokens=4, temperature=0
    )
    assert reply.choices[0].finish_reason == "length" and reply.usage is not None and reply.usage.completion_tokens == 4
    seen = [r["headers"] for r in proxy.faults.seen if r["path"].endswith("/chat/completions")]
    assert seen[-1]["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert not any("client-key-must-not-leak" in json.dumps(h) for h in seen)


def test_streaming_pass_through_with_usage(mesh: Mesh) -> None:
    chunks = list(
        mesh.openai().chat.completions.create(
            model=UPSTREAM_MODEL,
            # Greedy and a long answer: it runs to max_tokens (a sampled "Count to three."
            # sometimes ended on its own after 5 tokens).
            messages=[{"role": "user", "content": "Write a long story about a ship."}],
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


@pytest.mark.parametrize("model", [MODEL, UPSTREAM_MODEL])
def test_legacy_completions_on_both_engines(mesh: Mesh, model: str) -> None:
    reply = mesh.openai().completions.create(model=model, prompt="Once upon a time", max_tokens=5, temperature=0)
    assert reply.object == "text_completion" and reply.choices[0].text
    assert reply.usage is not None and reply.usage.completion_tokens == 5


def test_upstream_down_falls_back_and_garbage_is_a_502(mesh: Mesh, proxy: FaultProxy) -> None:
    proxy.faults.fail = [(503, None)] * 2
    reply = mesh.openai().chat.completions.create(
        model=UPSTREAM_MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3
    )
    assert reply.choices[0].message.content is not None  # answered by the embedded fallback
    proxy.faults.garbage = True
    raw = httpx.post(
        f"{mesh.v1}/chat/completions",
        json={"model": UPSTREAM_MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3},
        timeout=60,
    )
    assert raw.status_code == 502 and raw.json()["error"]["code"] == "bad_gateway"


def test_reload_through_the_admin_endpoint(mesh: Mesh, routed_mesh: tuple[Mesh, Path], proxy: FaultProxy) -> None:
    _, backends = routed_mesh
    url = f"{mesh.admin}/v1/admin/reload-backends"
    assert httpx.post(url).status_code == 401
    assert httpx.post(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
    ok = httpx.post(url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60)
    assert ok.status_code == 200 and UPSTREAM_MODEL in ok.json()["models"]
    good = backends.read_text()
    backends.write_text(good + "bogus_top_level_key: 1\n")
    try:
        bad = httpx.post(url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60)
        assert bad.status_code == 400 and "line" in bad.json()["error"]["message"]
        assert UPSTREAM_MODEL in [m.id for m in mesh.openai().models.list()]  # still the running configuration
    finally:
        backends.write_text(good)


def test_silent_upstream_is_cut_with_an_error_event(mesh: Mesh, proxy: FaultProxy) -> None:
    proxy.faults.stall_after_events = 2  # the role chunk and one token, then nothing
    body = {
        "model": UPSTREAM_MODEL,
        "messages": [{"role": "user", "content": "Count to fifty."}],
        "max_tokens": 40,
        "stream": True,
    }
    events = []
    with httpx.stream("POST", f"{mesh.v1}/chat/completions", json=body, timeout=60) as reply:
        assert reply.status_code == 200
        events = [line[len("data: ") :] for line in reply.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "stream_idle_timeout" and "sent nothing for 3 seconds" in error["message"]
    assert any("choices" in json.loads(e) for e in events[:-2]), "chunks before the stall reached the client"
    # The mesh serves the next request normally.
    proxy.faults.stall_after_events = None
    reply2 = mesh.openai().chat.completions.create(
        model=UPSTREAM_MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3
    )
    assert reply2.usage is not None and reply2.usage.completion_tokens == 3

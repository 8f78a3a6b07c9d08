"""Ollama's API through nginx, driven by the clients Ollama users have (issue #17): the `ollama`
Python client and LangChain's ChatOllama, pointed at the gateway instead of an Ollama server."""

from __future__ import annotations

import httpx
import ollama
import orjson
import pytest
from langchain_ollama import ChatOllama, OllamaEmbeddings

from .conftest import MODEL, Mesh
from .test_retrieval_api import DOCS, wait_job

pytestmark = pytest.mark.e2e

EMBEDDER = "all-MiniLM-L6-v2"
HELLO = [{"role": "user", "content": "Say hello to the moon."}]
GREEDY = {"temperature": 0, "num_predict": 6}


@pytest.fixture(scope="module")
def tides_collection(mesh: Mesh) -> str:
    """The collection the mesh's `facts-rag` alias answers from (as test_rag makes it)."""
    with httpx.Client(base_url=mesh.gateway, timeout=60) as http:
        http.post("/v1/collections", json={"name": "e2e-rag"})
        accepted = http.post("/v1/collections/e2e-rag/documents", json={"documents": DOCS}).json()
        job, _ = wait_job(http, accepted["job_id"])
        assert job["status"] == "succeeded"
    return "e2e-rag"


@pytest.fixture
def client(mesh: Mesh) -> ollama.Client:
    return ollama.Client(host=mesh.gateway, timeout=120)


def test_chat_whole_and_streamed_say_the_same(client: ollama.Client) -> None:
    whole = client.chat(model=MODEL, messages=HELLO, stream=False, options=GREEDY)
    assert whole.done and whole.done_reason == "length"
    assert whole.message.role == "assistant" and whole.message.content
    assert whole.eval_count == 6 and whole.prompt_eval_count and whole.prompt_eval_count > 0
    parts = list(client.chat(model=MODEL, messages=HELLO, stream=True, options=GREEDY))
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    assert "".join(p.message.content or "" for p in parts) == whole.message.content
    assert parts[-1].eval_count == 6 and parts[-1].done_reason == "length"


def test_chat_options_map_to_sampling(client: ollama.Client) -> None:
    short = client.chat(model=MODEL, messages=HELLO, options={"temperature": 0, "num_predict": 2})
    assert short.eval_count == 2
    stopped = client.chat(model=MODEL, messages=HELLO, options={"temperature": 0, "num_predict": 30, "stop": [" "]})
    assert stopped.done_reason == "stop" and " " not in (stopped.message.content or "")
    seeded = [
        client.chat(model=MODEL, messages=HELLO, options={"seed": 7, "temperature": 1.5, "num_predict": 8})
        for _ in range(2)
    ]
    assert seeded[0].message.content == seeded[1].message.content
    scored = client.chat(model=MODEL, messages=HELLO, options=GREEDY, logprobs=True, top_logprobs=2)
    assert scored.logprobs is not None and len(scored.logprobs) == 6
    assert "".join(t.token for t in scored.logprobs) == scored.message.content
    assert all(t.top_logprobs is not None and len(t.top_logprobs) == 2 for t in scored.logprobs)


def test_format_json_and_schema(client: ollama.Client) -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    schema["properties"]["name"]["maxLength"] = 12  # type: ignore[index]
    reply = client.chat(
        model=MODEL,
        messages=[{"role": "user", "content": "Give a name as JSON."}],
        format=schema,
        options={"temperature": 0, "num_predict": 100},
        keep_alive="5m",
    )
    assert reply.done_reason == "stop", reply.message.content
    assert isinstance(orjson.loads(reply.message.content or "")["name"], str)
    generated = client.generate(model=MODEL, prompt="A JSON object:", format="json", options={"num_predict": 100})
    text = generated.response or ""
    if generated.done_reason == "stop":
        assert isinstance(orjson.loads(text), dict)
    else:  # cut by num_predict: still JSON as far as it goes
        assert text.lstrip().startswith("{")


def test_generate_streamed_and_not(client: ollama.Client) -> None:
    whole = client.generate(model=MODEL, prompt="Why is the sky blue?", options=GREEDY)
    assert whole.done and whole.response and whole.eval_count == 6
    parts = list(client.generate(model=MODEL, prompt="Why is the sky blue?", options=GREEDY, stream=True))
    assert "".join(p.response or "" for p in parts) == whole.response and parts[-1].done
    raw = client.generate(model=MODEL, prompt="Once upon a time", raw=True, options=GREEDY)
    assert raw.response and raw.eval_count == 6
    loaded = client.generate(model=MODEL, prompt="")
    assert loaded.done and loaded.done_reason == "load"


def test_embed_and_older_embeddings(client: ollama.Client) -> None:
    reply = client.embed(model=EMBEDDER, input=["the cat", "a dog"])
    assert len(reply.embeddings) == 2 and len(reply.embeddings[0]) == 384
    one = client.embeddings(model=EMBEDDER, prompt="the cat")
    assert one.embedding == pytest.approx(reply.embeddings[0], abs=1e-5)


def test_list_show_ps_version(client: ollama.Client, mesh: Mesh) -> None:
    names = [m.model for m in client.list().models]
    assert MODEL in names and EMBEDDER in names
    shown = client.show(MODEL)
    assert shown.capabilities is not None and "completion" in shown.capabilities
    assert shown.modelinfo is not None and shown.modelinfo["llama.context_length"] > 0
    assert client.show(f"{MODEL}:latest").capabilities == shown.capabilities  # Ollama's default tag
    assert MODEL in [m.model for m in client.ps().models]
    version = httpx.get(f"{mesh.gateway}/api/version", timeout=10).json()
    assert version["version"].count(".") == 2


def test_a_bad_model_gets_ollamas_error(client: ollama.Client, mesh: Mesh) -> None:
    for call in (
        lambda: client.chat(model="no-such-model", messages=HELLO),
        lambda: list(client.chat(model="no-such-model", messages=HELLO, stream=True)),
        lambda: client.generate(model="no-such-model", prompt="hi"),
        lambda: client.show("no-such-model"),
    ):
        with pytest.raises(ollama.ResponseError) as caught:
            call()
        assert caught.value.status_code == 404 and "no-such-model" in caught.value.error
    raw = httpx.post(f"{mesh.gateway}/api/chat", json={"model": "no-such-model", "messages": HELLO}, timeout=30)
    assert raw.status_code == 404 and set(raw.json()) == {"error"} and isinstance(raw.json()["error"], str)
    bad = httpx.post(f"{mesh.gateway}/api/chat", content=b"{not json", timeout=30)
    assert bad.status_code == 400 and set(bad.json()) == {"error"}
    missing = httpx.get(f"{mesh.gateway}/api/nothing-here", timeout=30)
    assert missing.status_code == 404 and set(missing.json()) == {"error"}


def test_the_ndjson_wire_format(mesh: Mesh) -> None:
    body = {"model": MODEL, "messages": HELLO, "options": GREEDY}
    with httpx.stream("POST", f"{mesh.gateway}/api/chat", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/x-ndjson")
        lines = [orjson.loads(line) for line in response.iter_lines() if line]
    assert all(line["model"] == MODEL and line["created_at"].endswith("Z") for line in lines)
    assert lines[-1]["done"] is True and lines[-1]["message"] == {"role": "assistant", "content": ""}


def test_rag_alias_and_rag_field_answer_with_citations(mesh: Mesh, tides_collection: str) -> None:
    tides = [{"role": "user", "content": "What causes ocean tides?"}]
    # An alias bound to a collection: what a client that sends only a model name gets. (The ollama
    # client's types keep only Ollama's fields, so the citations are read from the raw body.)
    body = {"model": "facts-rag", "messages": tides, "options": GREEDY, "stream": False}
    reply = httpx.post(f"{mesh.gateway}/api/chat", json=body, timeout=60).json()
    assert reply["done"] and reply["message"]["content"]
    assert reply["rag"]["status"] == "ok" and reply["citations"][0]["document_id"] == "tides"
    # ragmesh's `rag` field is read on Ollama's bodies too, streamed: the done line carries them.
    body = {"model": MODEL, "messages": tides, "options": GREEDY, "rag": {"collection": tides_collection}}
    raw = httpx.post(f"{mesh.gateway}/api/chat", json=body, timeout=60)
    lines = [orjson.loads(line) for line in raw.text.splitlines() if line]
    assert lines[-1]["done"] and lines[-1]["rag"]["status"] == "ok" and lines[-1]["citations"]


def test_metrics_count_ollama_requests(mesh: Mesh, client: ollama.Client) -> None:
    client.chat(model=MODEL, messages=HELLO, options={"num_predict": 2})
    client.generate(model=MODEL, prompt="Hi", options={"num_predict": 2})
    metrics = httpx.get(f"http://127.0.0.1:{mesh.env['RAGMESH_PREPROCESS_HTTP_PORT']}/metrics", timeout=10).text
    assert 'endpoint="ollama_chat"' in metrics and 'endpoint="ollama_generate"' in metrics


def test_langchain_chat_ollama_invoke_and_stream(mesh: Mesh) -> None:
    llm = ChatOllama(base_url=mesh.gateway, model=MODEL, temperature=0, num_predict=6)
    answer = llm.invoke("Say hello to the moon.")
    assert isinstance(answer.content, str) and answer.content
    assert answer.usage_metadata is not None and answer.usage_metadata["output_tokens"] == 6
    streamed = list(llm.stream("Say hello to the moon."))
    assert len(streamed) > 1 and "".join(str(c.content) for c in streamed) == answer.content
    vectors = OllamaEmbeddings(base_url=mesh.gateway, model=EMBEDDER).embed_documents(["the cat"])
    assert len(vectors[0]) == 384

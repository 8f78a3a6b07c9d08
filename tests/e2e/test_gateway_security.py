"""A mesh with auth on, a tight per-address nginx limit and tracing to a test OTLP receiver.

Everything here goes through nginx, as a client on the network would.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from ..conftest import free_port
from .conftest import MODEL, Mesh, mesh_env, running_mesh

pytestmark = pytest.mark.e2e

ADMIN_KEY = "admin-" + "s3cret" * 4
CLI = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "ragmesh"
CLIENT_TIMEOUT = 2  # seconds nginx waits for a slow client's headers or body


class OtlpReceiver:
    """The OTLP/HTTP traces endpoint of a collector: keeps (service, span name, trace id, parent id) rows."""

    def __init__(self) -> None:
        self.spans: list[dict[str, str]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest.FromString(body)
                for resource_spans in request.resource_spans:
                    service = next(
                        a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name"
                    )
                    for scope in resource_spans.scope_spans:
                        for span in scope.spans:
                            receiver.spans.append(
                                {
                                    "service": service,
                                    "name": span.name,
                                    "trace": span.trace_id.hex(),
                                    "id": span.span_id.hex(),
                                    "parent": span.parent_span_id.hex(),
                                }
                            )
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, predicate: Any, timeout: float = 20.0) -> list[dict[str, str]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [s for s in list(self.spans) if predicate(s)]
            if found:
                return found
            time.sleep(0.2)
        raise AssertionError(f"no such span among {len(self.spans)} received")


@pytest.fixture(scope="module")
def otlp() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver()
    yield receiver
    receiver.server.shutdown()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, otlp: OtlpReceiver) -> Iterator[Mesh]:
    run_dir = tmp_path_factory.mktemp("secure")
    env = mesh_env(
        run_dir,
        RAGMESH_PREPROCESS_AUTH="on",
        RAGMESH_PREPROCESS_ADMIN_KEY=ADMIN_KEY,
        RAGMESH_PREPROCESS_RATE_LIMIT_WINDOW="4",
        RAGMESH_GATEWAY_RATE="20r/s",
        RAGMESH_GATEWAY_BURST="40",
        RAGMESH_GATEWAY_CLIENT_TIMEOUT=f"{CLIENT_TIMEOUT}s",
        RAGMESH_GATEWAY_MAX_BODY="1m",
        RAGMESH_INFERENCE_N_THREADS="1",
        RAGMESH_INFERENCE_N_THREADS_BATCH="1",
        OTEL_EXPORTER_OTLP_ENDPOINT=otlp.url,
        OTEL_BSP_SCHEDULE_DELAY="200",
    )
    with running_mesh(run_dir, env) as started:
        yield started


ISSUED: list[str] = []  # every secret the tests saw, for the log check at the end


def admin(mesh: Mesh, method: str, path: str, **kw: Any) -> httpx.Response:
    return httpx.request(
        method, f"{mesh.admin}/v1/admin/keys{path}", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30, **kw
    )


def new_key(mesh: Mesh, **fields: Any) -> str:
    reply = admin(mesh, "POST", "", json={"name": f"test-{len(ISSUED)}", **fields})
    assert reply.status_code == 201, reply.text
    ISSUED.append(reply.json()["key"])
    return str(reply.json()["key"])


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def chat(mesh: Mesh, key: str, **extra: Any) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8, **extra}
    return httpx.post(f"{mesh.v1}/chat/completions", json=body, headers=bearer(key), timeout=120)


def assert_error(reply: httpx.Response, status: int, type_: str) -> dict[str, Any]:
    assert reply.status_code == status, reply.text
    error: dict[str, Any] = reply.json()["error"]
    assert error["type"] == type_ and error["message"]
    assert error["request_id"] == reply.headers["x-request-id"]
    return error


# --- authentication ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Basic dXNlcjpwYXNz"}, {"Authorization": "Bearer"}, bearer("rm-" + "x" * 43)],
    ids=["missing", "basic scheme", "empty bearer", "unknown key"],
)
def test_bad_keys_are_401(mesh: Mesh, headers: dict[str, str]) -> None:
    reply = httpx.post(f"{mesh.v1}/chat/completions", json={"model": MODEL, "messages": []}, headers=headers)
    assert_error(reply, 401, "authentication_error")
    assert reply.headers["www-authenticate"].startswith("Bearer")


def test_forwarded_paths_need_a_key_like_every_route(mesh: Mesh) -> None:
    for path in ("/ranking", "/audio/speech", "/anything/else"):
        assert_error(httpx.post(f"{mesh.v1}{path}", json={"input": "x"}), 401, "authentication_error")
    # With a key the request goes on to forwarding: no backend owns it here.
    owned = httpx.post(f"{mesh.v1}/images/generations", json={"prompt": "x"}, headers=bearer(new_key(mesh)))
    assert_error(owned, 404, "invalid_request_error")


def test_the_openai_client_works_with_a_key_and_fails_cleanly_without(mesh: Mesh) -> None:
    key = new_key(mesh)
    client = openai.OpenAI(base_url=mesh.v1, api_key=key, max_retries=0)
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert reply.usage is not None and reply.usage.completion_tokens == 4
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=mesh.v1, api_key="rm-wrong", max_retries=0).models.list()


def test_public_health_and_authenticated_models(mesh: Mesh) -> None:
    assert httpx.get(f"{mesh.gateway}/health").status_code == 200
    assert httpx.get(f"{mesh.v1}/health/ready").status_code == 200
    assert httpx.get(f"{mesh.v1}/health/live").status_code == 200
    assert_error(httpx.get(f"{mesh.v1}/models"), 401, "authentication_error")
    listed = httpx.get(f"{mesh.v1}/models", headers=bearer(new_key(mesh)))
    assert MODEL in [m["id"] for m in listed.json()["data"]]


def test_revoked_and_expired_keys_are_401(mesh: Mesh) -> None:
    revoked = new_key(mesh)
    expiring = new_key(mesh, expires_in=1)
    assert httpx.get(f"{mesh.v1}/models", headers=bearer(revoked)).status_code == 200
    key_id = next(k["id"] for k in admin(mesh, "GET", "").json()["data"] if k["name"] == f"test-{len(ISSUED) - 2}")
    assert admin(mesh, "DELETE", f"/{key_id}").json()["revoked"] is True
    assert (
        "revoked"
        in assert_error(httpx.get(f"{mesh.v1}/models", headers=bearer(revoked)), 401, "authentication_error")["message"]
    )
    time.sleep(2.1)
    assert (
        "expired"
        in assert_error(httpx.get(f"{mesh.v1}/models", headers=bearer(expiring)), 401, "authentication_error")[
            "message"
        ]
    )


def test_admin_api_needs_the_admin_key_and_never_shows_secrets(mesh: Mesh) -> None:
    secret = new_key(mesh, rpm=10, tpm=1000, models=[MODEL])
    assert_error(httpx.get(f"{mesh.admin}/v1/admin/keys"), 401, "authentication_error")
    assert_error(httpx.get(f"{mesh.admin}/v1/admin/keys", headers=bearer(secret)), 401, "authentication_error")
    # Not on the public gateway at all, even with the admin key.
    assert_error(httpx.get(f"{mesh.v1}/admin/keys", headers=bearer(ADMIN_KEY)), 404, "invalid_request_error")
    listed = admin(mesh, "GET", "")
    assert listed.status_code == 200
    assert not any(s in listed.text for s in ISSUED)
    card = next(k for k in listed.json()["data"] if k["name"] == f"test-{len(ISSUED) - 1}")
    assert (card["rpm"], card["tpm"], card["models"]) == (10, 1000, [MODEL])
    assert admin(mesh, "POST", "", json={"name": "x", "rpm": "ten"}).status_code == 400
    assert admin(mesh, "DELETE", "/key_nope").status_code == 404


def test_a_key_limited_to_other_models_sees_this_one_as_absent(mesh: Mesh) -> None:
    key = new_key(mesh, models=["some-other-model"])
    error = assert_error(chat(mesh, key), 404, "invalid_request_error")
    assert error["code"] == "model_not_found"
    assert httpx.get(f"{mesh.v1}/models", headers=bearer(key)).json()["data"] == []
    assert httpx.get(f"{mesh.v1}/models/{MODEL}", headers=bearer(key)).status_code == 404


def test_rerank_takes_keys_model_limits_and_token_limits(mesh: Mesh) -> None:
    builtin = "ragmesh/sentence-rerank"  # the built-in stage: every mesh serves it
    body = {"model": builtin, "query": "what moves the sea", "documents": ["the moon moves the sea", "bread"]}
    nim = {"model": builtin, "query": {"text": "sea"}, "passages": [{"text": "the sea"}]}
    for path, sent in (("/rerank", body), ("/ranking", nim)):
        assert_error(httpx.post(f"{mesh.v1}{path}", json=sent), 401, "authentication_error")
        other = new_key(mesh, models=["some-other-model"])
        error = assert_error(
            httpx.post(f"{mesh.v1}{path}", json=sent, headers=bearer(other)), 404, "invalid_request_error"
        )
        assert error["code"] == "model_not_found"
    key = new_key(mesh, tpm=5, models=[builtin])
    first = httpx.post(f"{mesh.v1}/rerank", json=body, headers=bearer(key), timeout=30)
    assert first.status_code == 200, first.text
    assert first.json()["results"][0]["index"] == 0 and first.headers["x-ratelimit-limit-tokens"] == "5"
    assert first.json()["usage"]["total_tokens"] > 5
    # The tokens the reranker read were charged: the key is over its budget for a while.
    second = httpx.post(f"{mesh.v1}/rerank", json=body, headers=bearer(key), timeout=30)
    assert assert_error(second, 429, "rate_limit_error")["code"] == "rate_limit_exceeded"
    assert int(second.headers["retry-after"]) >= 1


def test_the_cli_creates_lists_and_revokes_keys(mesh: Mesh) -> None:
    env = {**os.environ, "RAGMESH_URL": mesh.gateway, "RAGMESH_ADMIN_URL": mesh.admin, "RAGMESH_ADMIN_KEY": ADMIN_KEY}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(CLI), *args], env=env, capture_output=True, text=True, timeout=60, check=False)

    created = cli("keys", "create", "from-cli", "--rpm", "7", "--expires-in", "2h", "--models", MODEL)
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip()
    ISSUED.append(secret)
    assert secret.startswith("rm-") and '"rpm": 7' in created.stderr
    assert httpx.get(f"{mesh.v1}/models", headers=bearer(secret)).status_code == 200
    listed = cli("keys", "list")
    row = next(line for line in listed.stdout.splitlines() if "from-cli" in line)
    assert "active" in row and MODEL in row and secret not in listed.stdout
    assert cli("keys", "revoke", row.split()[0]).returncode == 0
    assert httpx.get(f"{mesh.v1}/models", headers=bearer(secret)).status_code == 401
    refused = subprocess.run(
        [str(CLI), "keys", "list"], env={**env, "RAGMESH_ADMIN_KEY": "wrong"}, capture_output=True, text=True
    )
    assert refused.returncode != 0 and "admin key" in refused.stderr


def test_files_and_batches_are_seen_only_by_the_key_that_made_them(mesh: Mesh) -> None:
    alice = openai.OpenAI(base_url=mesh.v1, api_key=new_key(mesh), max_retries=0)
    bob = openai.OpenAI(base_url=mesh.v1, api_key=new_key(mesh), max_retries=0)
    line = {
        "custom_id": "only",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
    }
    uploaded = alice.files.create(file=("mine.jsonl", json.dumps(line).encode()), purpose="batch")
    batch = alice.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert "owner" not in batch.model_dump()
    assert alice.batches.retrieve(batch.id).id == batch.id
    assert batch.id in [b.id for b in alice.batches.list()]
    for attempt in (
        lambda: bob.batches.retrieve(batch.id),
        lambda: bob.files.retrieve(uploaded.id),
        lambda: bob.files.content(uploaded.id),
        lambda: bob.batches.cancel(batch.id),
        lambda: bob.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"),
    ):
        with pytest.raises(openai.NotFoundError):
            attempt()
    assert batch.id not in [b.id for b in bob.batches.list()]


# --- rate limits ---------------------------------------------------------------------------------


def wait_until_admitted(request: Any, timeout: float = 15.0) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        reply: httpx.Response = request()
        if reply.status_code != 429:
            return reply
        assert time.monotonic() < deadline, "the limit never reset"
        time.sleep(float(reply.headers["retry-after"]) / 4)


def test_requests_over_rpm_get_429_with_headers_then_pass_after_reset(mesh: Mesh) -> None:
    key = new_key(mesh, rpm=3)
    replies = [httpx.get(f"{mesh.v1}/models", headers=bearer(key)) for _ in range(4)]
    assert [r.status_code for r in replies] == [200, 200, 200, 429]
    assert [r.headers["x-ratelimit-remaining-requests"] for r in replies] == ["2", "1", "0", "0"]
    over = replies[-1]
    assert_error(over, 429, "rate_limit_error")
    assert over.json()["error"]["code"] == "rate_limit_exceeded"
    assert over.headers["x-ratelimit-limit-requests"] == "3"
    assert re.fullmatch(r"\d+\.\d{3}s", over.headers["x-ratelimit-reset-requests"])
    assert 1 <= int(over.headers["retry-after"]) <= 4
    again = wait_until_admitted(lambda: httpx.get(f"{mesh.v1}/models", headers=bearer(key)))
    assert again.status_code == 200


def test_tokens_over_tpm_get_429_then_pass_after_reset(mesh: Mesh) -> None:
    key = new_key(mesh, tpm=30)
    first = chat(mesh, key, max_tokens=16)
    assert first.status_code == 200 and first.headers["x-ratelimit-limit-tokens"] == "30"
    used = first.json()["usage"]["total_tokens"]
    assert used > 30, "the chat template alone is over this key's budget"
    time.sleep(0.3)  # tokens are charged just after the response is sent
    over = chat(mesh, key)
    assert_error(over, 429, "rate_limit_error")
    assert over.headers["x-ratelimit-remaining-tokens"] == "0" and over.headers["x-ratelimit-limit-tokens"] == "30"
    assert wait_until_admitted(lambda: chat(mesh, key, max_tokens=2)).status_code == 200


def test_per_key_usage_is_in_the_metrics_but_not_on_the_gateway(mesh: Mesh) -> None:
    key = new_key(mesh)
    name = f"test-{len(ISSUED) - 1}"
    with httpx.stream(
        "POST",
        f"{mesh.v1}/chat/completions",
        headers=bearer(key),
        timeout=120,
        json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "stream": True},
    ) as reply:
        assert reply.status_code == 200 and list(reply.iter_lines())
    assert httpx.get(f"{mesh.gateway}/metrics").status_code == 404
    text = httpx.get(f"http://127.0.0.1:{mesh.env['RAGMESH_PREPROCESS_HTTP_PORT']}/metrics").text
    assert re.search(rf'^ragmesh_key_requests_total\{{key="{name}"\}} 1\.0$', text, re.M)
    tokens = re.search(rf'^ragmesh_key_tokens_total\{{key="{name}"\}} (\S+)$', text, re.M)
    assert tokens and float(tokens.group(1)) > 5
    assert re.search(rf'^ragmesh:time_to_first_token_seconds_count\{{model="{MODEL}"\}} [1-9]', text, re.M)
    assert re.search(rf'^ragmesh:generation_tokens_total\{{model="{MODEL}"\}} [1-9]', text, re.M)
    engine = httpx.get(mesh.inference_metrics).text
    assert re.search(rf'^ragmesh:num_requests_running\{{model="{MODEL}"\}} 0\.0$', engine, re.M)
    assert re.search(rf'^ragmesh:num_requests_waiting\{{model="{MODEL}"\}} 0\.0$', engine, re.M)


# --- abuse at the gateway ------------------------------------------------------------------------


def test_a_body_over_the_limit_is_413(mesh: Mesh) -> None:
    reply = httpx.post(f"{mesh.v1}/chat/completions", content=b"x" * (1024 * 1024 + 100), headers=bearer(new_key(mesh)))
    assert_error(reply, 413, "invalid_request_error")


@pytest.mark.parametrize(
    "sent",
    [
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n",
    ],
    ids=["slow body", "slow headers"],
)
def test_slow_clients_are_cut(mesh: Mesh, sent: bytes) -> None:
    port = int(mesh.env["RAGMESH_GATEWAY_PORT"])
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(sent)
        sock.settimeout(CLIENT_TIMEOUT * 10)  # the test fails instead of hanging if nginx never cuts
        received = b""
        while chunk := sock.recv(4096):
            received += chunk
    assert received == b"" or received.startswith(b"HTTP/1.1 408"), received[:200]


@pytest.mark.parametrize(
    ("given", "kept"),
    [("trace-me_1.2:3", True), ("has space", False), ('q"uote', False), ("x" * 200, False), ("<script>", False)],
)
def test_client_request_ids_are_kept_only_when_safe(mesh: Mesh, given: str, kept: bool) -> None:
    reply = httpx.get(f"{mesh.v1}/models", headers={"X-Request-ID": given})  # a 401: no key
    rid = reply.headers["x-request-id"]
    assert (rid == given) is kept
    assert re.fullmatch(r"[A-Za-z0-9._:-]{1,128}", rid)
    assert reply.json()["error"]["request_id"] == rid


def test_request_id_reaches_every_service_log_and_the_trace(mesh: Mesh, otlp: OtlpReceiver) -> None:
    rid = f"trace-{int(time.time() * 1000)}"
    key = new_key(mesh)
    reply = httpx.post(
        f"{mesh.v1}/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3},
        headers={**bearer(key), "X-Request-ID": rid},
        timeout=120,
    )
    assert reply.status_code == 200 and reply.headers["x-request-id"] == rid
    # One trace: the HTTP span in preprocess, its gRPC calls served by inference and postprocess.
    root = otlp.wait_for(lambda s: s["service"] == "ragmesh-preprocess" and s["name"] == "POST /v1/chat/completions")
    traces = {s["trace"] for s in root}
    served = otlp.wait_for(lambda s: s["trace"] in traces and s["service"] == "ragmesh-inference")
    assert any("Generate" in s["name"] for s in served)
    assert otlp.wait_for(lambda s: s["trace"] in traces and s["service"] == "ragmesh-postprocess")
    logs = mesh.run_dir / "logs"
    time.sleep(0.5)  # log lines are flushed per line; give the last one a moment
    for service in ("preprocess", "inference", "postprocess"):
        lines = [json.loads(line) for line in _log_lines(logs, service) if line.startswith("{")]
        assert any(line.get("request_id") == rid for line in lines), f"{service} logged nothing under {rid}"
    assert any(f"rid={rid} " in line for line in _log_lines(logs, "nginx-access"))


def test_ingestion_trace_crosses_rabbitmq(mesh: Mesh, otlp: OtlpReceiver) -> None:
    key = new_key(mesh)
    assert httpx.post(f"{mesh.v1}/collections", json={"name": "traced"}, headers=bearer(key)).status_code in (200, 201)
    reply = httpx.post(
        f"{mesh.v1}/collections/traced/documents",
        json={"documents": [{"id": "d1", "text": "Tracing crosses the message queue."}]},
        headers=bearer(key),
        timeout=60,
    )
    assert reply.status_code == 202, reply.text
    publishers = otlp.wait_for(
        lambda s: s["service"] == "ragmesh-preprocess" and s["name"] == "POST /v1/collections/traced/documents"
    )
    traces = {s["trace"] for s in publishers}
    consumers = otlp.wait_for(lambda s: s["trace"] in traces and s["name"] == "ingest job", timeout=60)
    assert consumers[0]["service"] == "ragmesh-retrieval"


# nginx limits per client address; the flood comes from another loopback address so the tests
# after it (from 127.0.0.1) never meet the bucket it filled, whatever order they run in.
FLOOD_ADDRESS = "127.0.0.2"


def test_a_flood_from_one_address_is_cut_by_nginx_then_served_again(mesh: Mesh) -> None:
    async def flood() -> list[int]:
        transport = httpx.AsyncHTTPTransport(local_address=FLOOD_ADDRESS, limits=httpx.Limits(max_connections=200))
        async with httpx.AsyncClient(timeout=30, transport=transport) as client:
            replies = await asyncio.gather(*(client.get(f"{mesh.v1}/health/live") for _ in range(300)))
        return [r.status_code for r in replies]

    statuses = asyncio.run(flood())
    assert statuses.count(429) > 0 and statuses.count(200) > 0 and set(statuses) == {200, 429}
    # Another address is not limited by this one's flood.
    assert httpx.get(f"{mesh.v1}/health/live").status_code == 200
    with httpx.Client(transport=httpx.HTTPTransport(local_address=FLOOD_ADDRESS)) as flooder:
        refused = flooder.get(f"{mesh.v1}/health/live")
        while refused.status_code == 429:
            assert refused.json()["error"]["code"] == "rate_limit_exceeded" and refused.headers["retry-after"] == "1"
            time.sleep(0.5)  # polls until nginx's bucket drains; the assertion is on the status, not the time
            refused = flooder.get(f"{mesh.v1}/health/live")
    assert refused.status_code == 200


def test_no_key_ever_reaches_a_log(mesh: Mesh) -> None:
    # Runs last in this module: every key the tests created or sent has been used by now.
    assert len(ISSUED) > 5
    secrets_ = [*ISSUED, ADMIN_KEY, "rm-" + "x" * 43]
    for path in (mesh.run_dir / "logs").iterdir():
        text = path.read_text(errors="replace")
        leaked = [s[:8] for s in secrets_ if s in text]
        assert not leaked, f"{path.name} contains keys starting {leaked}"


def _log_lines(logs: Path, service: str) -> list[str]:
    return [
        line
        for path in logs.iterdir()
        if path.name.startswith(service)
        for line in path.read_text(errors="replace").splitlines()
    ]


# --- Ollama's API (issue #17): the same keys, model limits and token limits ----------------------


def test_ollama_routes_take_the_same_keys_and_limits(mesh: Mesh) -> None:
    import ollama

    hello = [{"role": "user", "content": "Hi"}]
    # No key: 401 in Ollama's error shape; /api/version stays public (clients probe it).
    refused = httpx.post(f"{mesh.gateway}/api/chat", json={"model": MODEL, "messages": hello})
    assert refused.status_code == 401 and set(refused.json()) == {"error"}
    assert httpx.get(f"{mesh.gateway}/api/tags").status_code == 401
    assert httpx.get(f"{mesh.gateway}/api/version").status_code == 200
    key = new_key(mesh, tpm=5, models=[MODEL])
    client = ollama.Client(host=mesh.gateway, headers=bearer(key), timeout=120)
    assert [m.model for m in client.list().models] == [MODEL]  # a key limited to a model sees only it
    first = client.chat(model=MODEL, messages=hello, options={"num_predict": 4})
    assert first.eval_count == 4 and first.prompt_eval_count and first.prompt_eval_count > 1
    # Its tokens were charged: the key is over its 5 tokens a minute.
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(model=MODEL, messages=hello, options={"num_predict": 4})
    assert caught.value.status_code == 429
    other = ollama.Client(host=mesh.gateway, headers=bearer(new_key(mesh, models=["some-other-model"])))
    with pytest.raises(ollama.ResponseError) as caught:
        other.chat(model=MODEL, messages=hello)
    assert caught.value.status_code == 404

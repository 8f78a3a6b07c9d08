"""The whole mesh, started the way `make up` starts it, on ports of its own."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from openai import OpenAI

from ..conftest import delete_topology_now, free_port, load_launcher, unique_namespace
from ..rerank_models import build_tiny_cross_encoder
from ..rerank_upstream import COHERE_MODEL, NIM_MODEL, RERANK_KEY, RerankUpstream, upstream_entry

ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = Path(os.environ.get("RAGMESH_SHARED_DATA", ROOT.parent / "shared" / "data"))
OPENAPI = SHARED_DATA / "openai" / "openapi.subset.json"
MODEL = "SmolLM2-135M-Instruct"
# Reranking models of the shared mesh: a local cross-encoder made by the tests, the built-in
# stage, and upstream rerankers written in the tests (one answering, one hung, one down).
TINY_RERANKER = "tiny-reranker"
BUILTIN_RERANKER = "ragmesh/sentence-rerank"
SLOW_RERANKER = "test/slow-reranker"
DOWN_RERANKER = "test/down-reranker"


@dataclass
class Mesh:
    run_dir: Path
    env: dict[str, str]
    gateway: str
    inference_metrics: str
    rerank_upstream: RerankUpstream | None = None
    tiny_reranker: Path | None = None

    @property
    def v1(self) -> str:
        return f"{self.gateway}/v1"

    @property
    def admin(self) -> str:
        """The gateway's internal admin server (the admin API)."""
        return f"http://127.0.0.1:{self.env['RAGMESH_GATEWAY_ADMIN_PORT']}"

    def openai(self, **kw: Any) -> OpenAI:
        return OpenAI(base_url=self.v1, api_key="not-needed", max_retries=0, **kw)

    def supervisorctl(self, *args: str) -> str:
        conf = self.run_dir / "supervisord.conf"
        out = subprocess.run(
            [str(ROOT / ".venv" / "bin" / "supervisorctl"), "-c", str(conf), *args],
            capture_output=True,
            text=True,
            check=False,
        )
        return out.stdout.strip()


def mesh_env(run_dir: Path, **extra: str) -> dict[str, str]:
    """Environment for a test mesh: every port free and its own, logs under run_dir."""
    env = dict(os.environ)
    for name in (
        "PREPROCESS_HTTP",
        "PREPROCESS_ADMIN",
        "GATEWAY_ADMIN",
        "INFERENCE_HTTP",
        "RETRIEVAL_HTTP",
        "POSTPROCESS_HTTP",
        "INFERENCE_GRPC",
        "RETRIEVAL_GRPC",
        "POSTPROCESS_GRPC",
        "GATEWAY",
    ):
        env[f"RAGMESH_{name}_PORT"] = str(free_port())
    # Peer addresses follow from the ports above.
    for key in (
        "RAGMESH_PREPROCESS_INFERENCE_ADDR",
        "RAGMESH_PREPROCESS_RETRIEVAL_ADDR",
        "RAGMESH_PREPROCESS_POSTPROCESS_ADDR",
    ):
        env.pop(key, None)
    env["RAGMESH_RUN_DIR"] = str(run_dir)
    # Queues and Redis keys of its own: a `make up` mesh on the same servers must not see them.
    env["RAGMESH_NAMESPACE"] = unique_namespace()
    env.update(extra)
    return env


def start_mesh(env: dict[str, str]) -> None:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "mesh.py"), "up", "--timeout", "180"], env=env, check=True)


def stop_mesh(env: dict[str, str]) -> None:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "mesh.py"), "down"], env=env, check=True)


@contextmanager
def running_mesh(run_dir: Path, env: dict[str, str]) -> Iterator[Mesh]:
    """Start a mesh with this environment (from mesh_env), stop it afterwards."""
    start_mesh(env)
    try:
        yield Mesh(
            run_dir=run_dir,
            env=env,
            gateway=f"http://127.0.0.1:{env['RAGMESH_GATEWAY_PORT']}",
            inference_metrics=f"http://127.0.0.1:{env['RAGMESH_INFERENCE_HTTP_PORT']}/metrics",
        )
    finally:
        stop_mesh(env)
        # The mesh's queues and exchanges leave the shared broker with it (every retrieval
        # replica's events queues included).
        amqp_url = env.get("RAGMESH_AMQP_URL") or env.get("AMQP_URL") or "amqp://guest:guest@127.0.0.1:5672/"
        delete_topology_now(amqp_url, env["RAGMESH_NAMESPACE"], retrieval_replica_ids(run_dir, env))


def launcher() -> Any:
    """scripts/mesh.py as a module (the launcher's own plan: ports, replicas, environments)."""
    return load_launcher()


def retrieval_replica_ids(run_dir: Path, env: dict[str, str]) -> list[str]:
    """The replica id of every retrieval replica the launcher started (one events queue each)."""
    mesh = launcher()
    own = env.get("RAGMESH_RETRIEVAL_REPLICA_ID") or socket.gethostname()
    replicas = mesh.make_plan(env, run_dir, running=True).replicas["retrieval"]
    return [mesh.replica_env(r, str(run_dir)).get("RAGMESH_RETRIEVAL_REPLICA_ID", own) for r in replicas]


@pytest.fixture(scope="session")
def rerank_upstreams() -> Iterator[tuple[RerankUpstream, RerankUpstream]]:
    """Upstream rerankers the shared mesh names: one that answers, one that never does."""
    with RerankUpstream() as answering, RerankUpstream() as hung:
        hung.faults.hang = True
        yield answering, hung


def rerank_backends(answering: RerankUpstream, hung: RerankUpstream) -> str:
    """The embedded engine, and upstream rerankers: NIM and /v1/rerank shapes, a hung one, a down one."""
    return (
        "backends:\n  - {name: embedded, type: embedded}\n"
        + upstream_entry("nim-rerank", answering.url, "ranking", NIM_MODEL)
        + upstream_entry("cohere-rerank", answering.url, "rerank", COHERE_MODEL)
        + upstream_entry("slow-rerank", hung.url, "rerank", SLOW_RERANKER)
        + upstream_entry("down-rerank", f"http://127.0.0.1:{free_port()}/v1", "ranking", DOWN_RERANKER)
        + "retry: {attempts: 1}\ncircuit_breaker: {failures: 1000}\n"
    )


@pytest.fixture(scope="session")
def mesh(
    tmp_path_factory: pytest.TempPathFactory, rerank_upstreams: tuple[RerankUpstream, RerankUpstream]
) -> Iterator[Mesh]:
    run_dir = tmp_path_factory.mktemp("mesh")
    tiny = build_tiny_cross_encoder(run_dir / "tiny-reranker")
    backends = run_dir / "backends.yaml"
    backends.write_text(rerank_backends(*rerank_upstreams))
    # A small body limit keeps the 413 test cheap; one engine thread leaves a core
    # for the rest of the mesh and for the tests.
    env = mesh_env(
        run_dir,
        RAGMESH_GATEWAY_MAX_BODY="1m",
        RAGMESH_PREPROCESS_MAX_BODY_BYTES=str(1024 * 1024),
        RAGMESH_PREPROCESS_MAX_DOCUMENTS_PER_REQUEST="50",
        RAGMESH_PREPROCESS_MODEL_ALIASES=json.dumps(
            {
                "facts-rag": {"model": MODEL, "collection": "e2e-rag", "top_k": 2},
                "facts-rag-lenient": {
                    "model": MODEL,
                    "collection": "e2e-rag",
                    "top_k": 2,
                    "on_retrieval_error": "no_context",
                },
            }
        ),
        RAGMESH_PREPROCESS_MAX_DOCUMENT_CHARS="200000",
        RAGMESH_PREPROCESS_MAX_FILE_BYTES="250000",
        RAGMESH_PREPROCESS_BATCH_BACKOFF_BASE="0.5",
        RAGMESH_INFERENCE_N_THREADS="1",
        RAGMESH_INFERENCE_N_THREADS_BATCH="1",
        RAGMESH_INFERENCE_BACKENDS_FILE=str(backends),
        TEST_RERANK_KEY=RERANK_KEY,
        RAGMESH_RETRIEVAL_RERANKERS=json.dumps({TINY_RERANKER: {"path": str(tiny), "batch_size": 4}}),
        RAGMESH_PREPROCESS_RERANK_TIMEOUT="3",
        # No guardrails on the shared mesh: logprobs (completions, Ollama) are refused while any is
        # on; the guardrails are tested through the gateway in test_tenant_abuse (defaults on).
        RAGMESH_POSTPROCESS_PII_REDACTION="[]",
    )
    with running_mesh(run_dir, env) as started:
        started.rerank_upstream = rerank_upstreams[0]
        started.tiny_reranker = tiny
        yield started


@pytest.fixture
def http(mesh: Mesh) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=mesh.gateway, timeout=60) as client:
        yield client


# --- OpenAI schema validation --------------------------------------------------


def _nullable_to_json_schema(node: Any) -> Any:
    """OpenAPI's `nullable: true` is not JSON Schema: rewrite it as a union with null."""
    if isinstance(node, list):
        return [_nullable_to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    node = {k: _nullable_to_json_schema(v) for k, v in node.items()}
    if node.pop("nullable", False):
        return {"anyOf": [node, {"type": "null"}]}
    return node


@pytest.fixture(scope="session")
def openapi_schema() -> dict[str, Any]:
    if not OPENAPI.is_file():
        pytest.skip(f"{OPENAPI} is absent: the OpenAI schema checks need ../shared/data (or RAGMESH_SHARED_DATA)")
    return dict(_nullable_to_json_schema(json.loads(OPENAPI.read_text())))


@pytest.fixture(scope="session")
def validate(openapi_schema: dict[str, Any]) -> Any:
    """validate(instance, "SchemaName") against the OpenAI OpenAPI subset."""

    def check(instance: Any, name: str) -> None:
        schema = {"$ref": f"#/components/schemas/{name}", "components": openapi_schema["components"]}
        jsonschema.validate(instance, schema)

    return check

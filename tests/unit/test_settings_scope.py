"""Each service has the settings it reads and no others; secrets reach only their readers
(settings classes, compose.yml, deploy/k8s, scripts/mesh.py)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from inference.settings import InferenceSettings
from postprocess.settings import PostprocessSettings
from preprocess.settings import PreprocessSettings
from retrieval.settings import RetrievalSettings

from ..conftest import load_launcher
from .test_deploy import SERVICES, env_names

ROOT = Path(__file__).resolve().parents[2]
# Every variable that holds a credential, whoever reads it.
SECRETS = {
    "RAGMESH_AMQP_URL",
    "RAGMESH_REDIS_URL",
    "RAGMESH_SERVICE_TOKEN",
    "RAGMESH_PREPROCESS_ADMIN_KEY",
    "RAGMESH_RABBITMQ_PASSWORD",
    "RAGMESH_REDIS_PASSWORD",
    "RAGMESH_ADMIN_KEY",
}


def source(service: str) -> str:
    return "\n".join(p.read_text() for p in (ROOT / "services" / service / "src").rglob("*.py"))


def secrets_read_by(service: str) -> set[str]:
    return env_names(SERVICES[service]) & SECRETS


@pytest.fixture(scope="module")
def launcher() -> ModuleType:
    return load_launcher("ragmesh_launcher_scope")


@pytest.mark.parametrize("service", list(SERVICES))
def test_a_service_has_the_connection_settings_of_what_it_uses_only(service: str) -> None:
    code, settings = source(service), SERVICES[service]
    uses_amqp = bool(re.search(r"\baio_pika\b|\bragmesh\.amqp", code))
    uses_redis = bool(re.search(r"\bredis\.asyncio\b|\bimport redis\b", code))
    serves_grpc = "run_grpc_service(" in code
    fields = settings.model_fields
    assert ("amqp_url" in fields) == uses_amqp, f"{service}: AMQP settings {'missing' if uses_amqp else 'unused'}"
    assert ("redis_url" in fields) == uses_redis, f"{service}: Redis settings {'missing' if uses_redis else 'unused'}"
    assert ("namespace" in fields) == (uses_amqp or uses_redis), f"{service}: a namespace for no shared state"
    for name in ("grpc_port", "drain_delay", "grpc_max_connection_age", "grpc_max_connection_age_grace"):
        assert (name in fields) == serves_grpc, f"{service}: {name} {'missing' if serves_grpc else 'unused'}"


def test_inference_and_postprocess_hold_no_amqp_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAGMESH_AMQP_URL", "amqp://ragmesh:s3cret@rabbitmq:5672/")
    monkeypatch.setenv("RAGMESH_REDIS_URL", "redis://:s3cret@redis:6379/0")
    for settings in (InferenceSettings(), PostprocessSettings()):
        assert "s3cret@rabbitmq" not in str(settings.model_dump())
    assert "s3cret@redis" not in str(InferenceSettings().model_dump())
    assert "s3cret" not in repr(PreprocessSettings()) and "s3cret" not in repr(RetrievalSettings())


@pytest.mark.parametrize("service", list(SERVICES))
def test_every_setting_has_a_reader_in_its_service(service: str) -> None:
    """Each field (inherited ones too) is read by the service's code or by the shared runner it calls."""
    code = source(service)
    runner = (ROOT / "libs" / "ragmesh" / "src" / "ragmesh" / "service.py").read_text()
    if "run_grpc_service(" not in code:  # an HTTP-only service runs run_http alone
        runner = runner[runner.index("def run_http(") : runner.index("def run_grpc_service(")]
    if "redis_client(settings)" in code:  # the shared Redis client factory reads the Redis settings
        runner += (ROOT / "libs" / "ragmesh" / "src" / "ragmesh" / "redis_client.py").read_text()
    unread = sorted(name for name in SERVICES[service].model_fields if not re.search(rf"\.{name}\b", code + runner))
    assert not unread, f"{service} has settings nothing reads: {unread}"


def test_compose_gives_each_service_the_secrets_it_reads_only() -> None:
    compose = yaml.safe_load((ROOT / "compose.yml").read_text())["services"]
    for service in SERVICES:
        given = set(compose[service]["environment"]) & SECRETS
        assert given == secrets_read_by(service), f"compose.yml {service}: {sorted(given ^ secrets_read_by(service))}"
    assert not set(compose["nginx"]["environment"]) & SECRETS


@pytest.mark.parametrize("target", ["base", "overlays/upstream"])
def test_kubernetes_gives_each_container_the_secrets_it_reads_only(target: str) -> None:
    flags = [] if target == "base" else ["--load-restrictor=LoadRestrictionsNone"]
    rendered = subprocess.run(
        ["kubectl", "kustomize", *flags, str(ROOT / "deploy" / "k8s" / target)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    seen = set()
    for doc in yaml.safe_load_all(rendered):
        if not doc or doc["kind"] not in ("Deployment", "StatefulSet"):
            continue
        for container in doc["spec"]["template"]["spec"]["containers"]:
            refs = {e["name"] for e in container.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}
            assert not any("secretRef" in source for source in container.get("envFrom", [])), "a whole Secret"
            name = container["name"]
            if name not in SERVICES:
                assert not refs & SECRETS, f"{doc['metadata']['name']}/{name} gets {sorted(refs & SECRETS)}"
                continue
            seen.add(name)
            wanted = secrets_read_by(name)
            if doc["metadata"]["name"] == "preprocess-batch":
                wanted -= {"RAGMESH_PREPROCESS_ADMIN_KEY"}  # no admin listener there
            assert refs & SECRETS == wanted, f"{doc['metadata']['name']}: {sorted((refs & SECRETS) ^ wanted)}"
    assert seen == set(SERVICES)


def test_the_launchers_secret_table_matches_the_settings(launcher: ModuleType) -> None:
    readers = sys.modules["mesh_env"].SECRET_READERS
    for service in SERVICES:
        reads = {name for name, who in readers.items() if service in who}
        expected = secrets_read_by(service) | (
            {"AMQP_URL"} if "RAGMESH_AMQP_URL" in secrets_read_by(service) else set()
        )
        expected |= {"REDIS_URL"} if "RAGMESH_REDIS_URL" in secrets_read_by(service) else set()
        assert reads == expected, service
    assert set(readers) >= SECRETS


def test_each_program_of_make_up_starts_without_the_secrets_it_does_not_read(
    launcher: ModuleType, tmp_path: Path
) -> None:
    """The commands supervisord runs, run for real with a stand-in for the service: what each sees."""
    secrets = {
        "RAGMESH_AMQP_URL": "amqp://ragmesh:amqp-secret@127.0.0.1:5672/",
        "AMQP_URL": "amqp://ragmesh:amqp-secret@127.0.0.1:5672/",
        "RAGMESH_REDIS_URL": "redis://:redis-secret@127.0.0.1:6379/0",
        "REDIS_URL": "redis://:redis-secret@127.0.0.1:6379/0",
        "RAGMESH_PREPROCESS_ADMIN_KEY": "admin-secret",
        "RAGMESH_RABBITMQ_PASSWORD": "amqp-secret",
        "RAGMESH_REDIS_PASSWORD": "redis-secret",
        "RAGMESH_ADMIN_KEY": "admin-secret",
    }
    plan = launcher.make_plan({}, tmp_path)
    plan.log_dir.mkdir(parents=True)
    conf = launcher.render_supervisord(plan, tmp_path / "nginx.conf", {})
    commands = dict(re.findall(r"^\[program:(\S+)\]\ncommand=(.*)$", conf.read_text(), re.M))
    env = launcher.service_env(plan, secrets)
    dump = "import json, os; print(json.dumps(dict(os.environ)))"
    for program, command in commands.items():
        argv = shlex.split(command)
        # The service (or nginx) itself replaced by a program that prints what it was given.
        cut = argv.index(str(plan.python)) if str(plan.python) in argv else len(argv) - 1
        if program == "nginx":
            cut = next(i for i, a in enumerate(argv) if a.endswith("nginx"))
        seen = json.loads(
            subprocess.run(
                [*argv[:cut], sys.executable, "-c", dump], env=env, capture_output=True, check=True, text=True
            ).stdout
        )
        service = program.split("-")[0]
        wanted = secrets_read_by(service) if service in SERVICES else set()
        held = {name for name in SECRETS if name in seen}
        assert held == wanted, f"{program} holds {sorted(held)}"
        if service in ("inference", "postprocess"):
            assert "amqp-secret" not in json.dumps(seen)
        if service == "inference" or program == "nginx":
            assert "redis-secret" not in json.dumps(seen)

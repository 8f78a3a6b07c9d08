"""Values that must agree across services: one source, or a start-up that refuses a mismatch."""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from inference.settings import InferenceSettings
from postprocess.settings import PostprocessSettings
from preprocess.settings import PreprocessSettings
from retrieval.index import Meta
from retrieval.settings import RetrievalSettings

from ..conftest import load_launcher

ROOT = Path(__file__).resolve().parents[2]
# The gateway's variables as nginx's template reads them.
NGINX_OF = {
    "NGINX_MAX_BODY": "RAGMESH_GATEWAY_MAX_BODY",
    "NGINX_TIMEOUT": "RAGMESH_GATEWAY_TIMEOUT",
    "NGINX_API_TIMEOUT": "RAGMESH_GATEWAY_API_TIMEOUT",
}


@pytest.fixture(scope="module")
def launcher() -> ModuleType:
    return load_launcher("ragmesh_launcher_agreement")


def test_the_body_limit_is_one_value_whichever_side_sets_it(launcher: ModuleType, tmp_path: Path) -> None:
    agreed = sys.modules["mesh_env"].agreed
    derived, problems = agreed({"RAGMESH_PREPROCESS_MAX_BODY_BYTES": str(8 * 1024 * 1024)})
    assert not problems and derived["RAGMESH_GATEWAY_MAX_BODY"] == "8m"
    derived, problems = agreed({"RAGMESH_GATEWAY_MAX_BODY": "4m"})
    assert not problems and derived["RAGMESH_PREPROCESS_MAX_BODY_BYTES"] == str(4 * 1024 * 1024)
    # What the services and nginx get from `make up`.
    plan = launcher.make_plan({}, tmp_path)
    env = {"RAGMESH_GATEWAY_MAX_BODY": "4m"}
    assert launcher.service_env(plan, env)["RAGMESH_PREPROCESS_MAX_BODY_BYTES"] == str(4 * 1024 * 1024)
    assert "client_max_body_size 4m;" in launcher.render_nginx(plan, env).read_text()
    env = {"RAGMESH_PREPROCESS_MAX_BODY_BYTES": "1000"}
    assert "client_max_body_size 1000;" in launcher.render_nginx(plan, env).read_text()


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"RAGMESH_GATEWAY_MAX_BODY": "16m", "RAGMESH_PREPROCESS_MAX_BODY_BYTES": "33554432"}, "disagree"),
        ({"RAGMESH_GATEWAY_TIMEOUT": "60s"}, "RAGMESH_PREPROCESS_REQUEST_TIMEOUT"),
        ({"RAGMESH_GATEWAY_TIMEOUT": "2m", "RAGMESH_PREPROCESS_REQUEST_TIMEOUT": "100"}, "STREAM_IDLE_TIMEOUT"),
        ({"RAGMESH_GATEWAY_API_TIMEOUT": "30s"}, "RAGMESH_PREPROCESS_RETRIEVAL_TIMEOUT"),
        ({"RAGMESH_GATEWAY_TIMEOUT": "ten minutes"}, "not an nginx time"),
    ],
)
def test_make_up_refuses_values_that_disagree_before_starting_anything(
    launcher: ModuleType,
    tmp_path: Path,
    env: dict[str, str],
    named: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def started(*args: object) -> None:
        raise AssertionError("up went on to start the mesh")

    # Nothing may start: a refusal comes before Redis, RabbitMQ and supervisord are touched.
    for step in ("ensure_redis", "ensure_rabbitmq", "render_supervisord", "render_nginx"):
        monkeypatch.setattr(launcher, step, started)
    plan = launcher.make_plan(env, tmp_path)
    assert launcher.up(plan, env, timeout=1) == 1
    assert named in capsys.readouterr().err
    assert not (tmp_path / "supervisord.conf").exists() and not (tmp_path / "mesh.json").exists()


def test_the_defaults_agree(launcher: ModuleType) -> None:
    derived, problems = sys.modules["mesh_env"].agreed({})
    assert not problems
    assert derived == {"RAGMESH_GATEWAY_MAX_BODY": "32m", "RAGMESH_PREPROCESS_MAX_BODY_BYTES": str(32 * 1024 * 1024)}
    assert PreprocessSettings().max_body_bytes == 32 * 1024 * 1024


def _gateway_view(nginx: dict[str, Any], preprocess: dict[str, Any]) -> dict[str, str]:
    env = {NGINX_OF[k]: str(v) for k, v in nginx.items() if k in NGINX_OF}
    env.update({k: str(v) for k, v in preprocess.items() if k.startswith("RAGMESH_PREPROCESS_")})
    return env


def test_compose_values_agree(launcher: ModuleType) -> None:
    compose = yaml.safe_load((ROOT / "compose.yml").read_text())["services"]
    env = _gateway_view(compose["nginx"]["environment"], compose["preprocess"]["environment"])
    assert sys.modules["mesh_env"].agreed(env)[1] == []
    # The body limit is one value (a YAML anchor), not two that happen to be equal.
    assert "NGINX_MAX_BODY: *max_body" in (ROOT / "compose.yml").read_text()


def test_kubernetes_values_agree(launcher: ModuleType) -> None:
    base = ROOT / "deploy" / "k8s" / "base"
    settings = yaml.safe_load((base / "settings.yaml").read_text())["data"]
    gateway = next(d for d in yaml.safe_load_all((base / "gateway.yaml").read_text()) if d["kind"] == "Deployment")
    nginx: dict[str, Any] = {}
    for item in gateway["spec"]["template"]["spec"]["containers"][0]["env"]:
        if "value" in item:
            nginx[item["name"]] = item["value"]
        else:  # read from the ConfigMap: the one source
            ref = item["valueFrom"]["configMapKeyRef"]
            assert ref["name"] == "ragmesh-settings"
            nginx[item["name"]] = settings[ref["key"]]
    assert nginx["NGINX_MAX_BODY"] == settings["RAGMESH_PREPROCESS_MAX_BODY_BYTES"]
    assert sys.modules["mesh_env"].agreed(_gateway_view(nginx, settings))[1] == []


def test_preprocess_refuses_limits_that_can_never_be_reached() -> None:
    with pytest.raises(ValidationError, match="MAX_FILE_BYTES"):
        PreprocessSettings(max_body_bytes=1024 * 1024, max_file_bytes=2 * 1024 * 1024)
    with pytest.raises(ValidationError, match="STREAM_IDLE_TIMEOUT"):
        PreprocessSettings(request_timeout=60, stream_idle_timeout=120)
    with pytest.raises(ValidationError, match="RAG_SEARCH_TIMEOUT"):
        PreprocessSettings(request_timeout=3, stream_idle_timeout=2, rag_search_timeout=5)
    assert PreprocessSettings(max_body_bytes=2048, max_file_bytes=2048).max_file_bytes == 2048
    # Unset, the file limit follows a smaller body limit (the gateway's, through make up) instead.
    assert PreprocessSettings(max_body_bytes=1024 * 1024).max_file_bytes == 1024 * 1024


def test_a_body_limit_set_on_the_gateway_alone_starts(launcher: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """make up with RAGMESH_GATEWAY_MAX_BODY=1m only (as the security e2e mesh runs): preprocess starts."""
    derived, problems = sys.modules["mesh_env"].agreed({"RAGMESH_GATEWAY_MAX_BODY": "1m"})
    assert not problems
    for name, value in derived.items():
        monkeypatch.setenv(name, value)
    settings = PreprocessSettings()
    assert settings.max_body_bytes == settings.max_file_bytes == 1024 * 1024
    monkeypatch.setenv("RAGMESH_PREPROCESS_MAX_FILE_BYTES", str(2 * 1024 * 1024))
    with pytest.raises(ValidationError, match="MAX_FILE_BYTES"):
        PreprocessSettings()


@pytest.mark.parametrize("settings", [PreprocessSettings, RetrievalSettings, InferenceSettings, PostprocessSettings])
def test_a_service_off_loopback_needs_the_service_credential(settings: type[Any]) -> None:
    with pytest.raises(ValidationError, match="RAGMESH_SERVICE_TOKEN"):
        settings(host="0.0.0.0")
    with pytest.raises(ValidationError, match="RAGMESH_SERVICE_TOKEN"):
        settings(host="10.1.2.3")
    assert settings(host="0.0.0.0", service_token="t" * 32).host == "0.0.0.0"
    for loopback in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert settings(host=loopback).service_token == ""


def test_retrieval_refuses_an_embedding_model_its_collections_were_not_built_with() -> None:
    from retrieval.server import check_dimensions  # what retrieval's start-up runs on the loaded collections

    embedder: Any = SimpleNamespace(model_name="other-model", dimensions=768)
    built = [Meta(name="docs", id="c1", created=0, dimensions=384), Meta(name="empty", id="c2", created=0)]
    with pytest.raises(RuntimeError, match=r"768-dimension vectors .* docs \(384\)"):
        check_dimensions(built, embedder)
    check_dimensions([Meta(name="docs", id="c1", created=0, dimensions=768)], embedder)
    check_dimensions([Meta(name="empty", id="c2", created=0)], embedder)  # nothing embedded yet


def test_chunks_are_measured_with_retrievals_embedding_model(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    settings = PreprocessSettings(embedding_model_path=str(model))
    assert settings.chunk_tokenizer_path() == str(model / "tokenizer.json")
    assert PreprocessSettings().chunk_tokenizer_path() is None  # the packaged model's, as retrieval's default
    with pytest.raises(ValidationError, match="not the tokenizer of retrieval's embedding model"):
        PreprocessSettings(embedding_model_path=str(model), tokenizer_path="/app/tokenizer.json")
    assert PreprocessSettings(embedding_model_path=str(model), tokenizer_path=str(model / "tokenizer.json"))


def test_chunks_longer_than_the_embedding_model_reads_are_refused() -> None:
    from preprocess.documents import check_chunk_length, load_tokenizer

    tokenizer = load_tokenizer()  # the packaged all-MiniLM-L6-v2: 256 tokens with [CLS] and [SEP]
    check_chunk_length(tokenizer, None, 254)
    with pytest.raises(RuntimeError, match=r"CHUNK_TOKENS=255 .* lower it to 254"):
        check_chunk_length(tokenizer, None, 255)

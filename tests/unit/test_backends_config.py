"""The backends file: what it accepts, and errors that name the line."""

from __future__ import annotations

from pathlib import Path

import pytest

from inference.config import ConfigError, EmbeddedBackend, UpstreamBackend, load_backends, parse_backends

ROOT = Path(__file__).resolve().parents[2]


def test_the_documented_example_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    config = load_backends(str(ROOT / "deploy" / "backends.example.yaml"))
    assert [b.name for b in config.backends] == ["embedded", "nvidia", "vllm"]
    nvidia = config.backends[1]
    assert isinstance(nvidia, UpstreamBackend) and nvidia.base_url == "https://integrate.api.nvidia.com/v1"
    assert config.routes["mistralai/mixtral-8x7b-instruct-v0.1"].fallback == ["SmolLM2-135M-Instruct"]
    monkeypatch.setenv("NVIDIA_API_KEY", "nvapi-secret")
    assert nvidia.api_key() == "nvapi-secret"


def test_no_file_means_the_embedded_engine_alone() -> None:
    config = load_backends("")
    assert len(config.backends) == 1 and isinstance(config.backends[0], EmbeddedBackend)


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("backends:\n  - name: a\n    type: openai\n    base_url: ftp://x\n    models: [m]\n", 4, "base_url"),
        ("backends:\n  - name: a\n    type: openai\n    base_url: http://x\n", 2, "models"),
        ("backends:\n  - name: a\n    type: embedded\n    colour: blue\n", 4, "colour"),
        ("backends:\n  - name: a\n    type: martian\n", 3, "type"),
        ("backends: [\n  {name: a\n", 3, "YAML"),
        ("backends:\n  - name: a\n    type: embedded\n  - name: a\n    type: embedded\n", 1, "unique"),
        ("backends:\n  - name: a\n    type: embedded\nroutes:\n  m:\n    backends: [b]\n", 1, "unknown backends"),
        (
            "backends:\n  - name: u\n    type: openai\n    base_url: http://x\n    models: [m]\n    timeout: -1\n",
            6,
            "timeout",
        ),
    ],
)
def test_errors_name_the_line(text: str, line: int, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_backends(text, "b.yaml")
    message = str(info.value)
    assert message.startswith(f"b.yaml, line {line}"), message
    assert words in message


def test_missing_key_environment_variable_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    config = parse_backends(
        "backends:\n  - {name: u, type: openai, base_url: 'http://x', models: [m], api_key_env: NO_SUCH_KEY_VAR}\n"
    )
    upstream = config.backends[0]
    assert isinstance(upstream, UpstreamBackend)
    with pytest.raises(ConfigError, match="NO_SUCH_KEY_VAR"):
        upstream.api_key()


def test_include_and_exclude_patterns() -> None:
    upstream = UpstreamBackend(
        name="u", type="openai", base_url="http://x", discover=True, include=["meta/*", "mistral*"], exclude=["*embed*"]
    )
    assert upstream.wants("meta/llama-3.1-8b-instruct") and upstream.wants("mistralai/mixtral")
    assert not upstream.wants("meta/llama-embed") and not upstream.wants("google/gemma")

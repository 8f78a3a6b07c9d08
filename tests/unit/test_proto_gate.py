"""The proto gate of `make test` (scripts/proto-gate): it fails a commit that breaks the contracts."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUF = ROOT / ".tools" / "node_modules" / ".bin" / "buf"
COMMON = Path("proto") / "ragmesh" / "v1" / "common.proto"


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A repository with this checkout's contracts and gate, main at one commit."""
    if not BUF.exists():
        pytest.fail(f"{BUF} is missing: make buf installs it (make test does)")
    shutil.copytree(ROOT / "proto", tmp_path / "proto")
    shutil.copy(ROOT / "buf.yaml", tmp_path)
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "proto-gate", tmp_path / "scripts")
    git(tmp_path, "init", "-q", "-b", "main")
    commit(tmp_path, "the contracts as they are")
    return tmp_path


def git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t"}
    env["GIT_COMMITTER_EMAIL"] = "t@t"
    return subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True, text=True).stdout


def commit(repo: Path, message: str) -> None:
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)


def edit(repo: Path, old: str, new: str) -> None:
    path = repo / COMMON
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def gate(repo: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PROTO_GATE_AGAINST"}
    return subprocess.run(
        [str(repo / "scripts" / "proto-gate")], cwd=repo, env={**env, "BUF": str(BUF)}, capture_output=True, text=True
    )


RENUMBER = ("int32 prompt_tokens = 1;", "int32 prompt_tokens = 9;")
ADD_FIELD = ("  int32 cached_prompt_tokens = 4;\n}", "  int32 cached_prompt_tokens = 4;\n  int32 audio_tokens = 40;\n}")


def test_a_commit_on_main_that_renumbers_a_field_fails_the_gate(repo: Path) -> None:
    # CI checks out main's new commit: it is compared with the main commit before it.
    edit(repo, *RENUMBER)
    commit(repo, "renumber a field")
    run = gate(repo)
    assert run.returncode != 0, run.stdout + run.stderr
    assert re.search(r'field "1" with name "prompt_tokens" on message "Usage" was deleted', run.stdout + run.stderr)


def test_an_additive_commit_on_main_passes(repo: Path) -> None:
    edit(repo, *ADD_FIELD)
    commit(repo, "add a field")
    run = gate(repo)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "buf breaking passed against" in run.stdout


def test_a_branch_is_compared_with_the_main_commit_it_started_from(repo: Path) -> None:
    git(repo, "checkout", "-q", "-b", "feature")
    edit(repo, *ADD_FIELD)
    commit(repo, "the branch adds a field")
    git(repo, "checkout", "-q", "main")
    edit(repo, "message ListModelsRequest {}", "message ListModelsRequest {\n  string tag = 1;\n}")
    commit(repo, "main adds another field meanwhile")
    git(repo, "checkout", "-q", "feature")
    # The branch lacks main's new field: that is not a break the branch made.
    assert gate(repo).returncode == 0
    edit(repo, *RENUMBER)
    run = gate(repo)  # uncommitted work is gated too
    assert run.returncode != 0 and "prompt_tokens" in run.stdout + run.stderr


def test_lint_refuses_an_enum_without_an_unspecified_zero_value(repo: Path) -> None:
    edit(repo, "FINISH_REASON_UNSPECIFIED = 0;", "FINISH_REASON_NONE = 0;")
    run = gate(repo)
    assert run.returncode != 0 and "_UNSPECIFIED" in run.stdout + run.stderr

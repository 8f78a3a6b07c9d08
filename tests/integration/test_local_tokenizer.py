"""The embedded model's tokenizer and chat template run in the inference process (inference.tokens)
count exactly as llama.cpp's own /apply-template + /tokenize, on real RAG prompts: 500 SciFact
passages formatted as RAG sources, and conversations with those sources rendered by the chat
template."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from inference.engine import LlamaCppEngine
from ragmesh.v1 import common_pb2, inference_pb2

from .conftest import MODEL

ROOT = Path(__file__).resolve().parents[2]
SCIFACT = Path(os.environ.get("RAGMESH_SHARED_DATA", ROOT.parent / "shared" / "data")) / "scifact"
# What preprocess's RAG fitting sends (preprocess.rag.format_passage, with_sources): the inference
# tests do not import the preprocess service, so the two formats are written out here.
INSTRUCTIONS = "Answer the question using the numbered sources below."


def scifact(name: str, count: int) -> list[dict[str, str]]:
    path = SCIFACT / name
    if not path.exists():
        pytest.skip(f"{path} is absent: this test needs ../shared/data (or RAGMESH_SHARED_DATA)")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()[:count]]


def conversation(*turns: tuple[str, str]) -> inference_pb2.TokenizeInput:
    messages = [common_pb2.ChatMessage(role=role, content=content) for role, content in turns]
    return inference_pb2.TokenizeInput(chat=inference_pb2.ChatInput(messages=messages))


async def test_the_engine_counts_in_process(engine: LlamaCppEngine) -> None:
    assert engine.counts_in_process  # the packaged SmolLM2 passed the load-time probes


async def test_in_process_counts_equal_llamacpp_on_scifact(engine: LlamaCppEngine) -> None:
    documents = scifact("corpus.jsonl", 500)
    queries = [q["text"] for q in scifact("queries.train.jsonl", 100)]
    passages = [f"[{i % 8 + 1}] {d['title']}\n{d['text']}\n\n" for i, d in enumerate(documents)]
    inputs = [inference_pb2.TokenizeInput(prompt=p) for p in passages]
    for i, query in enumerate(queries):
        sources = "".join(passages[4 * i : 4 * i + 4]).rstrip()
        system = f"{INSTRUCTIONS}\n\nSources:\n\n{sources}"
        inputs += [
            conversation(("user", query)),
            conversation(("system", system), ("user", query)),
            conversation(
                ("system", "Be brief."), ("user", query), ("assistant", documents[i]["title"]), ("user", "why?")
            ),
        ]
    local = await engine.count_many(inputs)
    reference = [await engine.count_through_llamacpp(i) for i in inputs]
    mismatched = [i for i, (a, b) in enumerate(zip(local, reference, strict=True)) if a != b]
    assert not mismatched, f"{len(mismatched)} of {len(inputs)} differ, first: {inputs[mismatched[0]]}"
    assert sum(len(ids) for ids in local) > 100_000  # the sample is a real one


async def test_tokenize_rpc_and_generation_agree_with_the_in_process_count(engine: LlamaCppEngine) -> None:
    request = inference_pb2.TokenizeRequest(model=MODEL, prompt="Ünïcödé 🙂 <|im_start|>user\n 1234  x")
    assert await engine.count_tokens(request) == await engine.count_through_llamacpp(request)

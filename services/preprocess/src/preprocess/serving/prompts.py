"""A legacy completion with a list of prompts: one generation per prompt, answered as one response.

OpenAI's /v1/completions takes a list of prompts (LangChain's `OpenAI(...).batch`
sends them in one request) and answers one choice per prompt and per `n`,
choice `index` = prompt position * n + choice. Each prompt runs the same path
as a single-prompt request (cache, RAG, inference -> postprocess); this module
joins their outputs: the choices renumbered, one id, usage summed, and (streamed)
the events of every prompt as they come, each carrying its choice's index.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Awaitable
from typing import Any

import orjson

from preprocess.pipeline import Answer
from ragmesh.errors import ErrorKind, RagmeshError
from ragmesh.v1 import common_pb2, postprocess_pb2

_END = object()


def summed(usages: list[common_pb2.Usage | None]) -> common_pb2.Usage:
    """The usage of several generations as one."""
    total = common_pb2.Usage()
    for usage in usages:
        if usage is None:
            continue
        total.prompt_tokens += usage.prompt_tokens
        total.completion_tokens += usage.completion_tokens
        total.total_tokens += usage.total_tokens
        total.cached_prompt_tokens += usage.cached_prompt_tokens
    return total


def _usage_body(usage: common_pb2.Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_prompt_tokens},
    }


class MultiPromptAnswer:
    """The answers of several prompts (each with `n` choices) as one Answer."""

    def __init__(self, answers: list[Answer], n: int, include_usage: bool) -> None:
        self._answers = answers
        self._n = n
        self._include_usage = include_usage
        self.usage: common_pb2.Usage | None = None

    def close(self) -> None:
        """Cancel every prompt's generation."""
        for answer in self._answers:
            answer.close()

    def _renumbered(self, body: dict[str, Any], position: int, envelope: dict[str, Any] | None) -> dict[str, Any]:
        for choice in body.get("choices") or []:
            choice["index"] = position * self._n + int(choice.get("index", 0))
        if envelope is not None:  # one id (and created) for the whole response
            body.update(envelope)
        return body

    async def collect(self) -> str:
        """Every prompt's response as one body: choices in index order, usage summed."""
        bodies = [orjson.loads(b) for b in await asyncio.gather(*(a.collect() for a in self._answers))]
        first = bodies[0]
        envelope = {"id": first["id"], "created": first["created"]}
        choices: list[dict[str, Any]] = []
        citations: list[Any] = []
        for position, body in enumerate(bodies):
            self._renumbered(body, position, envelope)
            for choice in body["choices"]:
                if "citations" in body:  # RAG: each prompt's own sources, on its choices
                    choice["citations"] = body["citations"]
                choices.append(choice)
            citations.extend(body.get("citations") or [])
        self.usage = summed([a.usage for a in self._answers])
        merged = {**first, "choices": sorted(choices, key=lambda c: c["index"]), "usage": _usage_body(self.usage)}
        if "citations" in first:
            merged["citations"] = citations
        return orjson.dumps(merged).decode()

    async def responses(self) -> AsyncGenerator[postprocess_pb2.ProcessResponse, None]:
        """Every prompt's stream events, interleaved as they come; one usage event and one end."""
        queue: asyncio.Queue[tuple[int, object]] = asyncio.Queue()

        async def pump(position: int, answer: Answer) -> None:
            try:
                async for response in answer.responses():
                    await queue.put((position, response))
                await queue.put((position, _END))
            except BaseException as exc:  # noqa: BLE001 - handed to the reader, which raises it
                await queue.put((position, exc))

        tasks = [asyncio.ensure_future(pump(i, a)) for i, a in enumerate(self._answers)]
        envelope: dict[str, Any] | None = None
        running = len(tasks)
        try:
            while running:
                position, item = await queue.get()
                if item is _END:
                    running -= 1
                    continue
                if isinstance(item, BaseException):
                    raise item
                assert isinstance(item, postprocess_pb2.ProcessResponse)
                if not item.chunk_json:
                    continue
                body = orjson.loads(item.chunk_json)
                if not body.get("choices"):
                    continue  # a prompt's own usage event: one for the whole request comes last
                if envelope is None:
                    envelope = {"id": body["id"], "created": body["created"]}
                yield postprocess_pb2.ProcessResponse(
                    chunk_json=orjson.dumps(self._renumbered(body, position, envelope)).decode()
                )
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(BaseException):
                    await task
        self.usage = summed([a.usage for a in self._answers])
        final = postprocess_pb2.ProcessResponse(generation_done=True, usage=self.usage)
        if self._include_usage and envelope is not None:
            body = {**envelope, "object": "text_completion", "choices": [], "usage": _usage_body(self.usage)}
            final.chunk_json = orjson.dumps(body).decode()
        yield final


async def opened_all(openings: list[Awaitable[tuple[Answer, str]]]) -> list[tuple[Answer, str]]:
    """Open every prompt's answer at once; if one is refused, the others are closed and its error raised."""
    results = await asyncio.gather(*openings, return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        for result in results:
            if not isinstance(result, BaseException):
                result[0].close()
        error = errors[0]
        if isinstance(error, RagmeshError | asyncio.CancelledError):
            raise error
        raise RagmeshError(ErrorKind.INTERNAL, f"opening a prompt failed: {type(error).__name__}") from error
    return [r for r in results if not isinstance(r, BaseException)]

"""Batch generation (PRIORITY_BATCH) on the embedded engine: each choice's output comes once it is
complete, so an interactive request may preempt it (the scheduler's preempt_for) at no cost to the
caller but the restart."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable

from inference.llamacpp_stream import DONE
from inference.scheduler import Slot, SlotScheduler
from ragmesh.errors import RagmeshError
from ragmesh.v1 import common_pb2, inference_pb2

# LlamaCppEngine._start_choice: runs one admitted choice in a worker thread holding a slot (batch or
# not), its chunks, errors and end (DONE) going to the queue.
StartChoice = Callable[[inference_pb2.GenerateRequest, int, bool, "asyncio.Queue[object]"], Slot]


async def generate_batch(
    start_choice: StartChoice, scheduler: SlotScheduler, request: inference_pb2.GenerateRequest, n: int
) -> AsyncGenerator[common_pb2.GenerationChunk, None]:
    """A batch request's choices, each once it is complete (see batch_choice), in order."""
    choices = [asyncio.ensure_future(batch_choice(start_choice, scheduler, request, index)) for index in range(n)]
    try:
        outputs = await asyncio.gather(*choices)
    finally:
        for choice in choices:
            choice.cancel()
    for chunks in outputs:
        for chunk in merged(chunks):
            yield chunk


async def batch_choice(
    start_choice: StartChoice, scheduler: SlotScheduler, request: inference_pb2.GenerateRequest, index: int
) -> list[common_pb2.GenerationChunk]:
    """One batch choice's whole output, generated in a slot interactive traffic leaves free
    and started over as often as it is preempted."""
    while True:
        await scheduler.wait_for_batch_room()
        scheduler.admit(1)
        queue: asyncio.Queue[object] = asyncio.Queue()
        slot = start_choice(request, index, True, queue)
        chunks: list[common_pb2.GenerationChunk] = []
        error: RagmeshError | None = None
        ended = False
        try:
            # Up to the thread's end, so that a preempted choice has left its slot when retried.
            while (item := await queue.get()) is not DONE:
                if isinstance(item, RagmeshError):
                    error = item
                else:
                    assert isinstance(item, common_pb2.GenerationChunk)
                    chunks.append(item)
            ended = True
        finally:
            if not ended:  # cancelled: the choice leaves its slot at its next token
                scheduler.stop(slot)
        if not slot.preempted:
            if error is not None:
                raise error
            return chunks


def merged(chunks: list[common_pb2.GenerationChunk]) -> list[common_pb2.GenerationChunk]:
    """A complete choice's text chunks as one (fewer messages downstream); chunks carrying
    extras (logprobs) are kept apart, and the finishing chunk comes last as it was."""
    out: list[common_pb2.GenerationChunk] = []
    for chunk in chunks:
        last = out[-1] if out else None
        mergeable = not chunk.extra_json and chunk.finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED
        if last is not None and mergeable and not last.extra_json and last.finish_reason == chunk.finish_reason:
            last.text += chunk.text
            last.completion_tokens = chunk.completion_tokens
            last.prompt_tokens = chunk.prompt_tokens
            last.cached_prompt_tokens = chunk.cached_prompt_tokens
        else:
            copy = common_pb2.GenerationChunk()
            copy.CopyFrom(chunk)
            out.append(copy)
    return out

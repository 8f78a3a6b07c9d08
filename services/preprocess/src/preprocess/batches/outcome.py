"""What handling a request comes to: its outcome, and what becomes of its message."""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aio_pika.abc import AbstractIncomingMessage
from prometheus_client import Counter, Gauge

from ragmesh.errors import RagmeshError

LINES = Counter("ragmesh_preprocess_batch_lines_total", "Batch and direct-protocol requests by outcome", ["outcome"])
RUNNING = Gauge("ragmesh_preprocess_batch_lines_running", "Batch lines being worked on by this replica")


class Verdict(enum.Enum):
    ACK = "ack"
    DEAD_LETTER = "dead_letter"  # rejected without requeue: the broker moves it to batch.dead


@dataclass(frozen=True)
class Outcome:
    """How a request ended: its response, or its final error (`exhausted`: out of retries)."""

    response: dict[str, Any] | None
    error: RagmeshError | None = None
    exhausted: bool = False


# Runs a request once for a message: its outcome, or None when it went to the retry queue.
Attempt = Callable[[AbstractIncomingMessage, str, dict[str, Any], str | None], Awaitable[Outcome | None]]

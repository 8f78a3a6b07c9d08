"""The direct queue protocol: requests published straight to the requests exchange (no HTTP).

A request is `{"v": 1, "url": ..., "body": {...}}` with `reply_to`, `correlation_id` and
`message_id`; its answer `{"v": 1, "status_code": ..., "body": ...}` goes to `reply_to` with the
same correlation_id. Answers are kept per message_id for a day, before they are sent, so a
request delivered again is answered from the stored answer, never run twice. A request that
cannot be read is answered with a 400 (when it says where to) and dead-lettered.
"""

from __future__ import annotations

import uuid

import aio_pika
import orjson
import redis.asyncio as aioredis
from aio_pika.abc import AbstractIncomingMessage

from preprocess.batches.lines import BATCH_URLS, SCHEMA_VERSION, Request
from preprocess.batches.outcome import LINES, Attempt, Outcome, Verdict
from ragmesh.amqp import message_headers
from ragmesh.amqp_client import LazyChannel
from ragmesh.errors import RagmeshError, invalid_request

# Seconds an answer is kept for a message_id sent again.
ANSWER_TTL = 24 * 3600
RESPONSE_TYPE = "ragmesh.response.v1"


def answer_body(outcome: Outcome) -> bytes:
    if outcome.error is None:
        return orjson.dumps({"v": SCHEMA_VERSION, "status_code": 200, "body": outcome.response})
    return error_body(outcome.error)


def error_body(err: RagmeshError) -> bytes:
    return orjson.dumps({"v": SCHEMA_VERSION, "status_code": err.http_status, "body": err.to_openai()})


class DirectProtocol:
    def __init__(self, redis: aioredis.Redis, namespace: str, publisher: LazyChannel, attempt: Attempt) -> None:
        self._redis = redis
        self._prefix = f"{namespace or 'ragmesh'}:direct:"
        self._publisher = publisher
        self._attempt = attempt

    async def handle(self, message: AbstractIncomingMessage, request: Request) -> Verdict:
        """Run (or recall) the request's answer and send it; a dependency failing raises (requeue)."""
        key = self._prefix + (message.message_id or uuid.uuid4().hex)
        raw = await self._redis.get(key) if message.message_id else None
        stored = raw if isinstance(raw, bytes) else None
        verdict = Verdict.ACK
        if stored is None:
            outcome: Outcome | None
            if request.url not in BATCH_URLS:
                outcome = Outcome(None, invalid_request(f"url must be one of {', '.join(BATCH_URLS)}.", param="url"))
            else:
                outcome = await self._attempt(message, request.url, request.body, None)
            if outcome is None:
                return Verdict.ACK  # a copy waits in the retry queue
            stored = answer_body(outcome)
            LINES.labels("ok" if outcome.error is None else "failed").inc()
            # Kept before it is sent: a redelivered request is answered from here, not run again.
            if message.message_id and not await self._redis.set(key, stored, nx=True, ex=ANSWER_TTL):
                earlier = await self._redis.get(key)
                stored = earlier if isinstance(earlier, bytes) else stored
            if outcome.exhausted:
                verdict = Verdict.DEAD_LETTER
        await self.reply(message, stored)
        return verdict

    async def refuse(self, message: AbstractIncomingMessage, reason: str) -> None:
        """Answer a request that cannot be read with a 400 in the protocol's shape."""
        await self.reply(message, error_body(invalid_request(reason, code="invalid_message")))

    async def reply(self, message: AbstractIncomingMessage, body: bytes) -> None:
        if not message.reply_to:
            return
        channel = await self._publisher.get()
        await channel.default_exchange.publish(
            aio_pika.Message(
                body,
                content_type="application/json",
                correlation_id=message.correlation_id,
                message_id=message.message_id,
                type=RESPONSE_TYPE,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                headers=message_headers(),
            ),
            routing_key=message.reply_to,
        )

"""The direct queue protocol: requests published straight to the requests exchange (no HTTP).

A request is `{"v": 1, "url": ..., "body": {...}}` with `reply_to`, `correlation_id` and
`message_id`; its answer `{"v": 1, "status_code": ..., "body": ...}` goes to `reply_to` with the
same correlation_id. Answers are kept per producer key and message_id for a day, before they are
sent, so a request delivered again is answered from the stored answer, never run twice. A request
that cannot be read is answered with a 400 (when it says where to) and dead-lettered.

Producers are tenants like HTTP clients: with auth on, a request carries its API key in the
`authorization` message header (`Bearer rm-...`) and is checked (401), limited (429) and charged
like an HTTP request. Answers go only where a producer can receive them and nowhere else: to
RabbitMQ's direct reply-to (`amq.rabbitmq.reply-to`, through the default exchange), or through
the reply exchange `{namespace}.direct.replies` (direct; bind your reply queue to it with its
name as the routing key). A `reply_to` naming a mesh queue (`ingest`, the requests queue) can
therefore never receive an answer.
"""

from __future__ import annotations

import uuid

import aio_pika
import orjson
import redis.asyncio as aioredis
from aio_pika import ExchangeType
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage

from preprocess.batches.lines import BATCH_URLS, SCHEMA_VERSION, Request
from preprocess.batches.outcome import LINES, Attempt, Outcome, Verdict
from preprocess.keys import KeyStore
from ragmesh.amqp import message_headers
from ragmesh.amqp_client import LazyChannel
from ragmesh.errors import RagmeshError, invalid_request
from ragmesh.redis_keys import DIRECT_ANSWER_TTL, RedisKeys

# Seconds an answer is kept for a message_id sent again.
ANSWER_TTL = DIRECT_ANSWER_TTL
RESPONSE_TYPE = "ragmesh.response.v1"
# RabbitMQ's pseudo-queue for direct replies (answered through the default exchange).
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"


def reply_exchange(namespace: str) -> str:
    """The exchange every other reply goes through (routing key: the request's reply_to)."""
    return f"{namespace or 'ragmesh'}.direct.replies"


def authorization_of(message: AbstractIncomingMessage) -> str | None:
    """The producer's `authorization` header (a bare `rm-...` key is taken as a bearer token)."""
    value = (message.headers or {}).get("authorization")
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str) or not value.strip():
        return None
    return value if " " in value.strip() else f"Bearer {value.strip()}"


def answer_body(outcome: Outcome) -> bytes:
    if outcome.error is None:
        return orjson.dumps({"v": SCHEMA_VERSION, "status_code": 200, "body": outcome.response})
    return error_body(outcome.error)


def error_body(err: RagmeshError) -> bytes:
    return orjson.dumps({"v": SCHEMA_VERSION, "status_code": err.http_status, "body": err.to_openai()})


class DirectProtocol:
    def __init__(
        self,
        redis: aioredis.Redis,
        namespace: str,
        publisher: LazyChannel,
        attempt: Attempt,
        keys: KeyStore | None = None,
    ) -> None:
        """`keys`: with auth on, the key store producers' keys are checked against (None: auth off)."""
        self._redis = redis
        self._schema = RedisKeys(namespace)
        self._publisher = publisher
        self._attempt = attempt
        self._keys = keys
        self._reply_exchange = reply_exchange(namespace)
        self._declared: tuple[object, AbstractExchange] | None = None

    async def _producer(self, message: AbstractIncomingMessage) -> str | None:
        """The id of the producer's key (None with auth off); a RagmeshError (401, 429) otherwise."""
        if self._keys is None:
            return None
        key = await self._keys.authenticate(authorization_of(message))
        await self._keys.admit(key)
        return key.id

    async def handle(self, message: AbstractIncomingMessage, request: Request) -> Verdict:
        """Run (or recall) the request's answer and send it; a dependency failing raises (requeue)."""
        try:
            owner = await self._producer(message)
        except RagmeshError as err:
            await self.reply(message, error_body(err))
            return Verdict.ACK
        # Stored answers are the producer's own: another key sending the same message_id gets none.
        key = self._schema.direct_answer(owner, message.message_id or uuid.uuid4().hex)
        raw = await self._redis.get(key) if message.message_id else None
        stored = raw if isinstance(raw, bytes) else None
        verdict = Verdict.ACK
        if stored is None:
            outcome: Outcome | None
            if request.url not in BATCH_URLS:
                outcome = Outcome(None, invalid_request(f"url must be one of {', '.join(BATCH_URLS)}.", param="url"))
            else:
                outcome = await self._attempt(message, request.url, request.body, owner)
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

    async def _exchange_for(self, reply_to: str) -> AbstractExchange:
        """The default exchange for direct reply-to, else the reply exchange: never a mesh queue."""
        channel = await self._publisher.get()
        if reply_to == DIRECT_REPLY_TO or reply_to.startswith(DIRECT_REPLY_TO + "."):
            return channel.default_exchange
        if self._declared is None or self._declared[0] is not channel:
            exchange = await channel.declare_exchange(self._reply_exchange, ExchangeType.DIRECT, durable=True)
            self._declared = (channel, exchange)
        return self._declared[1]

    async def reply(self, message: AbstractIncomingMessage, body: bytes) -> None:
        if not message.reply_to:
            return
        exchange = await self._exchange_for(message.reply_to)
        await exchange.publish(
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

"""A batch producer speaking ragmesh's direct queue protocol (no HTTP).

Publish a request to the `requests` exchange (routing key `request`; with a
namespace: `<namespace>.requests`) and read the answer on your reply queue:

    message body (JSON):  {"v": 1, "url": "/v1/chat/completions" | "/v1/completions" | "/v1/embeddings",
                           "body": {...the OpenAI request...}}
    properties:           reply_to (your queue, bound to the `<namespace>.direct.replies` exchange
                          by its name; or amq.rabbitmq.reply-to), correlation_id (matched on the
                          reply), message_id (idempotency: the same id is run once, answered each
                          time), delivery_mode 2, content_type application/json
    header:               authorization: "Bearer rm-..." (with auth on: checked, limited and charged
                          like HTTP; $RAGMESH_API_KEY here)
    optional header:      x-request-id (carried into the logs)
    reply body (JSON):    {"v": 1, "status_code": 200, "body": {...the OpenAI response...}}
                          or {"v": 1, "status_code": 4xx/5xx, "body": {"error": {...}}}

    .venv/bin/python examples/direct_producer.py "What is RAG?"
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from typing import Any

import aio_pika


async def request_once(
    amqp_url: str,
    namespace: str,
    url: str,
    body: dict[str, Any],
    message_id: str | None = None,
    wait_seconds: float = 120,
) -> dict[str, Any]:
    """Send one request and wait for its reply."""
    connection = await aio_pika.connect_robust(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        replies = await channel.declare_queue("", exclusive=True, auto_delete=True)
        # Answers come through the reply exchange (bound by the queue's name) or amq.rabbitmq.reply-to.
        reply_exchange = await channel.declare_exchange(
            f"{namespace}.direct.replies" if namespace else "ragmesh.direct.replies",
            aio_pika.ExchangeType.DIRECT,
            durable=True,
        )
        await replies.bind(reply_exchange, routing_key=replies.name)
        exchange = await channel.get_exchange(f"{namespace}.requests" if namespace else "requests")
        correlation_id = uuid.uuid4().hex
        await exchange.publish(
            aio_pika.Message(
                json.dumps({"v": 1, "url": url, "body": body}).encode(),
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                reply_to=replies.name,
                correlation_id=correlation_id,
                message_id=message_id or uuid.uuid4().hex,
                headers={"authorization": f"Bearer {os.environ['RAGMESH_API_KEY']}"}
                if os.environ.get("RAGMESH_API_KEY")
                else {},
            ),
            routing_key="request",
        )
        async with replies.iterator(timeout=wait_seconds) as incoming:
            async for message in incoming:
                async with message.process():
                    if message.correlation_id == correlation_id:
                        reply: dict[str, Any] = json.loads(message.body)
                        return reply
    raise TimeoutError("no reply")


async def main() -> None:
    question = sys.argv[1] if len(sys.argv) > 1 else "Say hello."
    reply = await request_once(
        os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"),
        os.environ.get("RAGMESH_NAMESPACE", ""),
        "/v1/chat/completions",
        {"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": question}], "max_tokens": 32},
    )
    print(json.dumps(reply, indent=2))


if __name__ == "__main__":
    asyncio.run(main())

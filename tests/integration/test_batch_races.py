"""Batch state under races and faults, on the real Redis and RabbitMQ.

Each test stops a replica at an exact step with a hook on its Redis client (or a failing
publish), never with a sleep, and checks that nothing is stuck, lost, counted twice or
written twice: every line has one result, counts equal the total, one output file.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pytest
import redis.asyncio as aioredis
from redis.exceptions import TimeoutError as RedisTimeout

from ragmesh.errors import ErrorKind, RagmeshError

from ..conftest import delete_topology, unique_namespace
from .batch_harness import (
    FakeRunner,
    embedding_lines,
    faulty_redis,
    file_contents,
    mentions,
    output_records,
    replica,
    running_lines,
    settings_for,
    submit,
    until,
    wait_final,
    writes_status,
)


@pytest.fixture
async def broker(amqp_url: str) -> AsyncIterator[str]:
    """A namespace of its own; its queues and exchanges leave the shared broker afterwards."""
    namespace = unique_namespace()
    yield namespace
    await delete_topology(amqp_url, namespace)


@pytest.fixture
async def clean_redis(redis_url: str, broker: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    keys = [k async for k in client.scan_iter(f"{broker}:*", count=1000)]
    if keys:
        await client.delete(*keys)
    await client.aclose()


def one_result_each(files_dir: Path, n: int, prefix: str = "l") -> list[dict[str, Any]]:
    records = output_records(files_dir)
    assert sorted(r["custom_id"] for r in records) == sorted(f"{prefix}{i}" for i in range(n)), "one result per line"
    return records


async def test_a_worker_dying_right_after_storing_a_result_still_lets_the_batch_finish(
    tmp_path: Path, redis_url: str, amqp_url: str, broker: str, clean_redis: aioredis.Redis
) -> None:
    """Crash between record and count: the replica stops for good right after the result of
    line l3 reached Redis; its unacked message goes to another replica, which must not leave the
    batch short of one count."""
    settings = settings_for(broker, redis_url, amqp_url, tmp_path, batch_workers=1)
    run = FakeRunner()
    crashed, never = asyncio.Event(), asyncio.Event()
    dying = faulty_redis(redis_url)

    async def die_once_l3_is_stored(args: tuple[Any, ...], reply: Any) -> None:
        if crashed.is_set() or not batch_ids:
            return
        if await clean_redis.hexists(f"{broker}:batch:{batch_ids[0]}:results", "l3"):
            crashed.set()
            await never.wait()  # this replica is frozen from here on, as if SIGKILLed

    batch_ids: list[str] = []
    dying.after.append(die_once_l3_is_stored)
    async with replica(settings, aioredis.Redis.from_url(redis_url), run, workers=False) as api:
        async with replica(settings, dying, run) as first:
            batch = await submit(api, embedding_lines(8))
            batch_ids.append(batch["id"])
            await asyncio.wait_for(crashed.wait(), 30)
            await first.close()  # its connection goes: the broker hands its unacked line on
        async with replica(settings, aioredis.Redis.from_url(redis_url), run):
            done = await wait_final(api, batch["id"])
        never.set()
    assert done["status"] == "completed"
    assert done["request_counts"] == {"total": 8, "completed": 8, "failed": 0}
    one_result_each(tmp_path, 8)
    assert run.calls["t3"] == 1, "the stored result was kept, not run again"


async def test_a_redis_timeout_inside_the_handler_gives_the_line_back(
    tmp_path: Path, redis_url: str, amqp_url: str, broker: str, clean_redis: aioredis.Redis
) -> None:
    """Two Redis timeouts (a CLIENT PAUSE as the worker reads the batch) with two prefetch slots:
    each delivery must be nacked, not left holding its slot for ever."""
    settings = settings_for(broker, redis_url, amqp_url, tmp_path, batch_workers=2)
    timeouts = 2
    flaky = faulty_redis(redis_url)
    batch_ids: list[str] = []

    async def time_out(args: tuple[Any, ...], reply: Any) -> None:
        nonlocal timeouts
        if timeouts and batch_ids and mentions(args, batch_ids[0]):
            timeouts -= 1
            raise RedisTimeout("injected: Timeout reading from socket")

    async with (
        replica(settings, aioredis.Redis.from_url(redis_url), FakeRunner(), workers=False) as api,
        replica(settings, flaky, FakeRunner()),
    ):
        flaky.before.append(time_out)
        batch = await submit(api, embedding_lines(6))
        batch_ids.append(batch["id"])
        done = await wait_final(api, batch["id"])
    assert timeouts == 0, "the fault was injected"
    assert done["status"] == "completed" and done["request_counts"]["completed"] == 6
    one_result_each(tmp_path, 6)


async def test_lines_finishing_before_create_reports_in_progress_are_finalized_once(
    tmp_path: Path, redis_url: str, amqp_url: str, broker: str, clean_redis: aioredis.Redis
) -> None:
    """create publishes, then marks the batch in_progress. If every line finished and the batch
    was finalized in between, the batch must not go back to in_progress and get a second set of
    output files."""
    settings = settings_for(broker, redis_url, amqp_url, tmp_path, batch_workers=4)
    slow_api = faulty_redis(redis_url)
    paused = asyncio.Event()

    async def hold_in_progress_write(args: tuple[Any, ...], reply: Any) -> None:
        if paused.is_set() or not writes_status(args, "in_progress"):
            return
        paused.set()
        # The worker stores the only line's result and settles its message meanwhile.
        results = [k async for k in clean_redis.scan_iter(f"{broker}:batch:*:results")]

        async def finished() -> bool:
            keys = results or [k async for k in clean_redis.scan_iter(f"{broker}:batch:*:results")]
            return bool(keys) and await clean_redis.hlen(keys[0]) == 1 and running_lines() == 0

        await until(finished, what="the line's result")

    slow_api.before.append(hold_in_progress_write)
    async with (
        replica(settings, slow_api, FakeRunner(), workers=False) as api,
        replica(settings, aioredis.Redis.from_url(redis_url), FakeRunner()),
    ):
        batch = await submit(api, embedding_lines(1))
        assert paused.is_set()
        done = await wait_final(api, batch["id"])
        again = await api.get(batch["id"], None)
    assert done["status"] == again["status"] == "completed"
    assert again["output_file_id"] == done["output_file_id"]
    assert len(file_contents(tmp_path)) == 2, "the input file and one output file"
    one_result_each(tmp_path, 1)


async def test_a_cancel_racing_the_finalizer_leaves_one_outcome_and_one_set_of_files(
    tmp_path: Path, redis_url: str, amqp_url: str, broker: str, clean_redis: aioredis.Redis
) -> None:
    """The cancel read the batch while its lines ran; the last line finishes and the batch is
    finalized before the cancel writes. The cancel must not undo the finished batch."""
    settings = settings_for(broker, redis_url, amqp_url, tmp_path, batch_workers=4)
    run = FakeRunner()
    run.gate = asyncio.Event()
    slow_api = faulty_redis(redis_url)
    paused = asyncio.Event()

    async def hold_the_cancel_write(args: tuple[Any, ...], reply: Any) -> None:
        if paused.is_set() or not writes_status(args, "cancelling"):
            return
        paused.set()
        assert run.gate is not None
        run.gate.set()  # the lines finish now, and the batch is finalized

        async def finalized() -> bool:
            return len(file_contents(tmp_path)) >= 2 and running_lines() == 0

        await until(finalized, what="the finalizer's output")

    async with (
        replica(settings, slow_api, run, workers=False) as api,
        replica(settings, aioredis.Redis.from_url(redis_url), run),
    ):
        batch = await submit(api, embedding_lines(3))
        await asyncio.wait_for(run.started.wait(), 30)
        slow_api.before.append(hold_the_cancel_write)
        try:
            answer = await api.cancel(batch["id"], None)
        except RagmeshError as err:
            assert err.kind is ErrorKind.CONFLICT
        else:
            assert answer["status"] == "completed"
        done = await wait_final(api, batch["id"])
        again = await api.get(batch["id"], None)
    assert paused.is_set()
    assert done["status"] == again["status"] == "completed"
    assert done["request_counts"] == {"total": 3, "completed": 3, "failed": 0}
    assert len(file_contents(tmp_path)) == 2, "the input file and one output file"
    one_result_each(tmp_path, 3)


async def test_a_poison_line_is_dead_lettered_even_when_publishing_fails(
    tmp_path: Path,
    redis_url: str,
    amqp_url: str,
    broker: str,
    clean_redis: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An undecodable message must reach batch.dead although every publish of the replica fails:
    the broker dead-letters it; nothing depends on a republish that may not happen."""
    settings = settings_for(broker, redis_url, amqp_url, tmp_path, batch_workers=2)
    async with replica(settings, aioredis.Redis.from_url(redis_url), FakeRunner()) as worker:
        assert await worker.check() == "ok"  # the topology exists
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.get_exchange(f"{broker}.requests")
            dead = await channel.get_queue(f"{broker}.batch.dead")

            async def broken_publish(self: Any, *args: Any, **kwargs: Any) -> None:
                raise ConnectionError("injected: publish failed")

            await exchange.publish(aio_pika.Message(b"\xff not json"), routing_key="request")
            monkeypatch.setattr(aio_pika.Exchange, "publish", broken_publish)
            found: list[bytes] = []

            async def dead_lettered() -> bool:
                message = await dead.get(fail=False)
                if message is not None:
                    found.append(message.body)
                    await message.ack()
                return bool(found)

            await until(dead_lettered, what="the poison message in batch.dead")
    assert found == [b"\xff not json"]


async def test_a_direct_request_that_cannot_be_read_is_answered_then_dead_lettered(
    tmp_path: Path, redis_url: str, amqp_url: str, broker: str, clean_redis: aioredis.Redis
) -> None:
    """A producer waiting on reply_to gets a 4xx in the protocol's shape, not silence."""
    settings = settings_for(broker, redis_url, amqp_url, tmp_path, batch_workers=2)
    async with replica(settings, aioredis.Redis.from_url(redis_url), FakeRunner()) as worker:
        assert await worker.check() == "ok"
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            replies = await channel.declare_queue("", exclusive=True, auto_delete=True)
            exchange = await channel.get_exchange(f"{broker}.requests")
            for n, body in enumerate((b"not json", orjson.dumps({"v": 2, "url": "/v1/embeddings", "body": {}}))):
                await exchange.publish(
                    aio_pika.Message(body, reply_to=replies.name, correlation_id=f"c{n}", message_id=f"m{n}"),
                    routing_key="request",
                )
            answers: dict[str, dict[str, Any]] = {}

            async def answered() -> bool:
                message = await replies.get(fail=False)
                if message is not None:
                    answers[str(message.correlation_id)] = orjson.loads(message.body)
                    await message.ack()
                return len(answers) == 2

            await until(answered, what="both replies")
            dead = await channel.get_queue(f"{broker}.batch.dead")
            bodies: list[bytes] = []

            async def both_dead() -> bool:
                message = await dead.get(fail=False)
                if message is not None:
                    bodies.append(message.body)
                    await message.ack()
                return len(bodies) == 2

            await until(both_dead, what="both messages in batch.dead")
    for answer in answers.values():
        assert answer["v"] == 1 and answer["status_code"] == 400
        assert {"message", "type", "param", "code"} <= set(answer["body"]["error"])


async def test_a_redis_timeout_as_create_marks_the_batch_in_progress_does_not_leave_it_stuck(
    tmp_path: Path, redis_url: str, amqp_url: str, broker: str, clean_redis: aioredis.Redis
) -> None:
    """create published every line, then Redis timed out on the validating -> in_progress write:
    the client is told to retry (a Redis error), the lines run all the same, and the batch must
    end `completed` once they are done, not wait in `validating` for its completion window."""
    settings = settings_for(broker, redis_url, amqp_url, tmp_path, batch_workers=4)
    flaky_api = faulty_redis(redis_url)
    refused: list[bool] = []

    async def time_out_the_in_progress_write(args: tuple[Any, ...], reply: Any) -> None:
        if not refused and writes_status(args, "in_progress"):
            refused.append(True)
            raise RedisTimeout("injected: Timeout reading from socket")

    flaky_api.before.append(time_out_the_in_progress_write)
    async with (
        replica(settings, flaky_api, FakeRunner(), workers=False) as api,
        replica(settings, aioredis.Redis.from_url(redis_url), FakeRunner()),
    ):
        uploaded = await api.upload(embedding_lines(5), "lines.jsonl", "batch", None)
        with pytest.raises(RedisTimeout):
            await api.create({"input_file_id": uploaded["id"], "endpoint": "/v1/embeddings"}, None)
        assert refused, "the fault was injected"
        [batch_id] = [b["id"] for b in (await api.list(20, None, None))["data"]]
        done = await wait_final(api, batch_id)
    assert done["status"] == "completed"
    assert done["request_counts"] == {"total": 5, "completed": 5, "failed": 0}
    one_result_each(tmp_path, 5)


class HugeNumberRunner(FakeRunner):
    """Answers line t1 with an integer JSON allows and orjson cannot write (past 64 bits), as an
    upstream's answer may: storing that line's result raises."""

    async def __call__(self, url: str, body: dict[str, Any]) -> dict[str, Any]:
        answer = await super().__call__(url, body)
        if body.get("input") == "t1":
            answer["usage"] = {"prompt_tokens": 2**70}
        return answer


async def test_a_line_whose_handling_raises_fails_alone_and_the_batch_still_ends(
    tmp_path: Path, redis_url: str, amqp_url: str, broker: str, clean_redis: aioredis.Redis
) -> None:
    """A poison line (its handler raised something that is no dependency failure) goes to
    batch.dead, and its failure is recorded: the batch ends with that line failed instead of
    waiting in_progress for its completion window."""
    settings = settings_for(broker, redis_url, amqp_url, tmp_path, batch_workers=2)
    async with (
        replica(settings, aioredis.Redis.from_url(redis_url), FakeRunner(), workers=False) as api,
        replica(settings, aioredis.Redis.from_url(redis_url), HugeNumberRunner()),
    ):
        batch = await submit(api, embedding_lines(3))
        done = await wait_final(api, batch["id"])
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            channel = await connection.channel()
            dead = await channel.get_queue(f"{broker}.batch.dead")
            found: list[bytes] = []

            async def dead_lettered() -> bool:
                message = await dead.get(fail=False)
                if message is not None:
                    found.append(message.body)
                    await message.ack()
                return bool(found)

            await until(dead_lettered, what="the poison line in batch.dead")
    assert done["status"] == "completed"
    assert done["request_counts"] == {"total": 3, "completed": 2, "failed": 1}
    records = {r["custom_id"]: r for r in one_result_each(tmp_path, 3)}
    assert records["l1"]["response"]["status_code"] == 500 and records["l1"]["error"]["code"] == "line_failed"
    assert [orjson.loads(body)["custom_id"] for body in found] == ["l1"]


async def test_a_direct_request_whose_handling_raises_is_answered_500_then_dead_lettered(
    tmp_path: Path, redis_url: str, amqp_url: str, broker: str, clean_redis: aioredis.Redis
) -> None:
    """The producer waiting on reply_to hears about a request that broke its handler, too."""
    settings = settings_for(broker, redis_url, amqp_url, tmp_path, batch_workers=2)
    async with replica(settings, aioredis.Redis.from_url(redis_url), HugeNumberRunner()) as worker:
        assert await worker.check() == "ok"
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            replies = await channel.declare_queue("", exclusive=True, auto_delete=True)
            exchange = await channel.get_exchange(f"{broker}.requests")
            request = {"v": 1, "url": "/v1/embeddings", "body": {"model": "m", "input": "t1"}}
            await exchange.publish(
                aio_pika.Message(orjson.dumps(request), reply_to=replies.name, correlation_id="c1", message_id="m1"),
                routing_key="request",
            )
            answers: list[dict[str, Any]] = []

            async def answered() -> bool:
                message = await replies.get(fail=False)
                if message is not None:
                    assert message.correlation_id == "c1"
                    answers.append(orjson.loads(message.body))
                    await message.ack()
                return bool(answers)

            await until(answered, what="the reply")
            dead = await channel.get_queue(f"{broker}.batch.dead")
            assert await dead.get(timeout=10) is not None
    assert answers[0]["v"] == 1 and answers[0]["status_code"] == 500
    assert answers[0]["body"]["error"]["code"] == "line_failed"

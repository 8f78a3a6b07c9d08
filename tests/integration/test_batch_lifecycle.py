"""A batch's life on the real Redis and RabbitMQ: its completion window, its retention, listings
per owner, files, and workers that lose their channel. Time moves by hand (a fake clock)."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from preprocess.batches import api as api_module
from preprocess.batches import finalizer as finalizer_module
from preprocess.batches import lines as lines_module
from preprocess.batches import worker as worker_module
from ragmesh import amqp
from ragmesh.errors import RagmeshError

from ..conftest import delete_topology, unique_namespace
from .batch_harness import (
    FakeClock,
    FakeRunner,
    embedding_lines,
    faulty_redis,
    file_contents,
    output_records,
    replica,
    running_lines,
    settings_for,
    submit,
    until,
    wait_final,
)


@pytest.fixture
async def broker(amqp_url: str) -> AsyncIterator[str]:
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


def lines_ok() -> float:
    return REGISTRY.get_sample_value("ragmesh_preprocess_batch_lines_total", {"outcome": "ok"}) or 0.0


async def test_lines_not_done_within_the_window_fail_with_batch_expired(
    tmp_path: Path, redis_url: str, amqp_url: str, broker: str, clean_redis: aioredis.Redis
) -> None:
    """No worker runs: when the window is over, the batch ends `expired`, every line in the
    error file (input order) with code batch_expired, counts equal to the total."""
    clock = FakeClock()
    settings = settings_for(broker, redis_url, amqp_url, tmp_path, batch_sweep_interval=0)
    async with replica(settings, aioredis.Redis.from_url(redis_url), FakeRunner(), workers=False, clock=clock) as api:
        batch = await submit(api, embedding_lines(4), completion_window="1h")
        assert batch["expires_at"] == batch["created_at"] + 3600
        await api.sweeper.sweep()
        assert (await api.get(batch["id"], None))["status"] == "in_progress"  # not yet
        clock.now += 3601
        await api.sweeper.sweep()
        done = await api.get(batch["id"], None)
        assert done["status"] == "expired" and done["expired_at"] is not None
        assert done["request_counts"] == {"total": 4, "completed": 0, "failed": 4}
        assert done["output_file_id"] is None
        errors = [orjson.loads(x) for x in (await api.files.content(done["error_file_id"], None)).splitlines()]
        assert [e["custom_id"] for e in errors] == ["l0", "l1", "l2", "l3"]
        assert {e["error"]["code"] for e in errors} == {"batch_expired"}
        # A worker that takes a line of the expired batch now does nothing with it.
        runner = FakeRunner()
        async with replica(settings, aioredis.Redis.from_url(redis_url), runner, clock=clock) as worker:

            async def drained() -> bool:
                channel = await (await worker.publisher.connection()).channel()
                queue = await channel.declare_queue(f"{broker}.batch.requests", passive=True)
                await channel.close()
                return queue.declaration_result.message_count == 0 and running_lines() == 0

            await until(drained, what="the expired batch's lines drained")
        assert not runner.calls


async def test_a_line_finishing_while_the_batch_expires_is_not_counted_twice(
    tmp_path: Path,
    redis_url: str,
    amqp_url: str,
    broker: str,
    clean_redis: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Finalize racing a late line: the finalizer closed the batch (the window is over) and has not
    read the results yet when the lines finish. Their results must be refused (the files and counts
    agree), not added beside an expired record of the same line."""
    monkeypatch.setattr(worker_module, "CANCEL_CHECK_SECONDS", 3600.0)  # the lines do not look themselves
    clock = FakeClock()
    settings = settings_for(broker, redis_url, amqp_url, tmp_path, batch_sweep_interval=0, batch_workers=4)
    run = FakeRunner()
    run.gate = asyncio.Event()
    slow = faulty_redis(redis_url)
    ok_before = lines_ok()

    async def lines_finish_after_the_close(args: tuple[Any, ...], reply: Any) -> None:
        if reply in (b"expired", "expired") and run.gate is not None and not run.gate.is_set():
            run.gate.set()

            async def late_lines_settled() -> bool:
                return lines_ok() - ok_before == 3 and running_lines() == 0

            await until(late_lines_settled, what="the late lines")

    async with (
        replica(settings, slow, run, workers=False, clock=clock) as api,
        replica(settings, aioredis.Redis.from_url(redis_url), run, clock=clock),
    ):
        batch = await submit(api, embedding_lines(3))
        await until(lambda: _ran(run, 3), what="three lines running")
        slow.after.append(lines_finish_after_the_close)
        clock.now += 25 * 3600
        done = await api.get(batch["id"], None)
    assert run.gate.is_set(), "the lines finished after the close"
    assert done["status"] == "expired"
    assert done["request_counts"] == {"total": 3, "completed": 0, "failed": 3}
    records = output_records(tmp_path)
    assert sorted(r["custom_id"] for r in records) == ["l0", "l1", "l2"]
    assert {r["error"]["code"] for r in records} == {"batch_expired"}


async def _ran(run: FakeRunner, n: int) -> bool:
    return sum(run.calls.values()) >= n


async def test_finished_batches_and_files_are_deleted_after_the_retention(
    tmp_path: Path, redis_url: str, amqp_url: str, broker: str, clean_redis: aioredis.Redis
) -> None:
    clock = FakeClock()
    settings = settings_for(broker, redis_url, amqp_url, tmp_path, batch_sweep_interval=0, batch_retention=3600.0)
    async with replica(settings, aioredis.Redis.from_url(redis_url), FakeRunner(), clock=clock) as api:
        batch = await wait_final(api, (await submit(api, embedding_lines(2)))["id"])
        assert batch["status"] == "completed"
        output = await api.files.info(batch["output_file_id"], None)
        assert output["expires_at"] == output["created_at"] + 3600
        for window in ("0h", "24", "1w", "31d", 24):
            with pytest.raises(RagmeshError) as bad:
                await submit(api, embedding_lines(1), completion_window=window)
            assert bad.value.http_status == 400 and bad.value.param == "completion_window"
        clock.now += 1800
        await api.sweeper.sweep()
        assert (await api.get(batch["id"], None))["status"] == "completed"
        clock.now += 1801
        await api.sweeper.sweep()
        for gone in (api.get(batch["id"], None), api.files.info(batch["output_file_id"], None)):
            with pytest.raises(RagmeshError) as info:
                await gone
            assert info.value.http_status == 404
        assert (await api.list(20, None, None))["data"] == []
        assert file_contents(tmp_path) == []
        assert [k async for k in clean_redis.scan_iter(f"{broker}:batch:*")] == []


async def test_batches_and_files_are_listed_per_owner_newest_first_in_pages(
    tmp_path: Path, redis_url: str, amqp_url: str, broker: str, clean_redis: aioredis.Redis
) -> None:
    clock = FakeClock()
    settings = settings_for(broker, redis_url, amqp_url, tmp_path, batch_sweep_interval=0)
    async with replica(settings, aioredis.Redis.from_url(redis_url), FakeRunner(), workers=False, clock=clock) as api:
        ids = []
        for _ in range(3):
            clock.now += 1
            uploaded = await api.upload(embedding_lines(1), "in.jsonl", "batch", "key_a")
            created = await api.create({"input_file_id": uploaded["id"], "endpoint": "/v1/embeddings"}, "key_a")
            ids.append(created["id"])
        other = await api.upload(embedding_lines(1), "in.jsonl", "batch", "key_b")
        theirs = (await api.create({"input_file_id": other["id"], "endpoint": "/v1/embeddings"}, "key_b"))["id"]

        first = await api.list(2, None, "key_a")
        assert [b["id"] for b in first["data"]] == [ids[2], ids[1]] and first["has_more"]
        rest = await api.list(2, first["last_id"], "key_a")
        assert [b["id"] for b in rest["data"]] == [ids[0]] and not rest["has_more"]
        assert [b["id"] for b in (await api.list(20, None, "key_b"))["data"]] == [theirs]
        assert all("owner" not in b for b in first["data"])

        files = await api.files.list("key_a", limit=2)
        assert len(files["data"]) == 2 and files["has_more"]
        assert files["data"][0]["created_at"] >= files["data"][1]["created_at"]
        more = await api.files.list("key_a", after=files["last_id"], limit=10)
        assert len(more["data"]) == 1 and not more["has_more"]
        assert (await api.files.list("key_a", purpose="batch_output"))["data"] == []
        oldest_first = await api.files.list("key_a", order="asc")
        assert [f["id"] for f in oldest_first["data"]] == [f["id"] for f in [*files["data"], *more["data"]]][::-1]

        with pytest.raises(RagmeshError) as foreign:
            await api.files.delete(other["id"], "key_a")
        assert foreign.value.http_status == 404
        victim = more["data"][0]["id"]
        assert await api.files.delete(victim, "key_a") == {"id": victim, "object": "file", "deleted": True}
        with pytest.raises(RagmeshError):
            await api.files.content(victim, "key_a")
        assert victim not in [f["id"] for f in (await api.files.list("key_a"))["data"]]
        assert not (tmp_path / f"{victim}.jsonl").exists()


async def test_workers_that_lose_their_channel_come_back_and_say_so_meanwhile(
    tmp_path: Path,
    redis_url: str,
    amqp_url: str,
    broker: str,
    clean_redis: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The broker closes the consumer's channel, and the next declaration fails once: readiness
    says the workers are down, then they consume again by themselves."""
    settings = settings_for(broker, redis_url, amqp_url, tmp_path, batch_workers=2)
    async with replica(settings, aioredis.Redis.from_url(redis_url), FakeRunner()) as worker:

        async def consuming() -> bool:
            return worker.ready() == {"batch_workers": "ok"}

        await until(consuming, what="the workers consuming")
        real_declare = amqp.declare_requests
        failed = asyncio.Event()

        async def declare_failing_once(channel: Any, topology: Any) -> Any:
            if not failed.is_set():
                failed.set()
                raise aio_pika.exceptions.ChannelClosed(406, "injected: declaration failed")
            return await real_declare(channel, topology)

        monkeypatch.setattr(worker_module, "declare_requests", declare_failing_once)
        queue = worker.worker._consumer._queue
        assert queue is not None
        with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):
            # A channel error: the broker closes the workers' channel.
            await queue.channel.declare_queue(f"absent-{uuid.uuid4().hex}", passive=True)
        await asyncio.wait_for(failed.wait(), 30)
        assert worker.ready()["batch_workers"].startswith("down")
        await until(consuming, what="the workers consuming again")
        batch = await wait_final(worker, (await submit(worker, embedding_lines(3)))["id"])
    assert batch["status"] == "completed" and batch["request_counts"]["completed"] == 3


async def test_big_files_are_parsed_and_written_off_the_event_loop(
    tmp_path: Path,
    redis_url: str,
    amqp_url: str,
    broker: str,
    clean_redis: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Up to 50,000 lines / 30 MB: parsing the input (upload, create) and writing the output
    (finalize) run in worker threads, never on the event loop that serves every other request."""
    loop_thread = threading.get_ident()
    threads: dict[str, set[bool]] = {"parse": set(), "write": set()}
    real_parse, real_write = lines_module.parse_batch_lines, finalizer_module._Sink.write

    def parse(data: bytes, max_lines: int) -> Any:
        threads["parse"].add(threading.get_ident() == loop_thread)
        return real_parse(data, max_lines)

    def write(self: Any, custom_ids: list[str], values: list[bytes | None]) -> None:
        threads["write"].add(threading.get_ident() == loop_thread)
        real_write(self, custom_ids, values)

    monkeypatch.setattr(api_module, "parse_batch_lines", parse)
    monkeypatch.setattr(finalizer_module._Sink, "write", write)
    settings = settings_for(broker, redis_url, amqp_url, tmp_path, batch_workers=2)
    async with replica(settings, aioredis.Redis.from_url(redis_url), FakeRunner()) as api:
        batch = await wait_final(api, (await submit(api, embedding_lines(3)))["id"])
    assert batch["status"] == "completed"
    assert threads == {"parse": {False}, "write": {False}}, "parsed (upload, create) and written, in threads only"

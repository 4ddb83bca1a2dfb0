"""The reporter that app services publish events with: debouncing, contracts, confirms, a bounded buffer.

A broker restart under the reporter is in fault/test_reporter_restart.py.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from datetime import UTC, datetime

import aio_pika
import orjson
import pydantic
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from consumer.broker import Names
from consumer.reporter import MAX_BODY_BYTES, BufferFull, Reporter, ReporterError
from consumer.settings import Settings
from schemas import EVENT_ADAPTER

from ..helpers.amqp import queue_ready, take_all
from ..helpers.config import AMQP_URL
from ..helpers.waiting import wait_for


class Clock:
    """The reporter's clock, set by the test: the time of each call is then known."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def tick(self) -> datetime:
        self.now = datetime.now(UTC)
        return self.now

    def __call__(self) -> datetime:
        return self.now


def reporter(settings: Settings, **options: object) -> Reporter:
    return Reporter(
        AMQP_URL,
        app_id="builder-api",
        exchange=Names(settings.topology_prefix).events_exchange,
        **options,  # type: ignore[arg-type]
    )


async def taken(channel: AbstractChannel, queue_name: str, count: int) -> list[AbstractIncomingMessage]:
    """Wait until ``count`` messages are in the queue, then take them all."""
    await wait_for(lambda: _has(channel, queue_name, count), timeout=30, what=f"{count} messages")
    return await take_all(channel, queue_name)


async def _has(channel: AbstractChannel, queue_name: str, count: int) -> bool:
    return await queue_ready(channel, queue_name) >= count


async def test_activity_is_debounced_to_one_event_per_interval_with_the_latest_time(
    settings: Settings, channel: AbstractChannel
) -> None:
    clock = Clock()
    interval, duration = 0.4, 1.8
    sandboxes = [f"sbx-chatty-{i}" for i in range(3)]
    last: dict[str, datetime] = {}
    calls = 0
    async with reporter(settings, activity_interval=interval, clock=clock) as r:
        started = time.monotonic()
        while time.monotonic() - started < duration:
            for sandbox in sandboxes:
                last[sandbox] = clock.tick()
                r.activity(sandbox, "terminal")
                calls += 1
            await asyncio.sleep(0.002)  # a keystroke every few milliseconds
    # closed: the last activity of each sandbox is flushed
    at_most = int(duration / interval) + 2  # the first at once, one per interval, the last at close
    messages = await taken(channel, Names(settings.topology_prefix).events_queue, len(sandboxes) * 2)
    total = len(messages)
    times: dict[str, list[datetime]] = defaultdict(list)
    for msg in messages:
        event = EVENT_ADAPTER.validate_json(msg.body)
        times[event.sandbox_id].append(event.occurred_at)
    assert set(times) == set(sandboxes)
    for sandbox, seen in times.items():
        assert 2 <= len(seen) <= at_most, (sandbox, len(seen))
        assert max(seen) == last[sandbox], "the last event carries the latest activity"
        assert len(set(seen)) == len(seen)
    assert calls > 50 * total, (calls, total)


async def test_every_event_passes_the_contracts(settings: Settings, channel: AbstractChannel) -> None:
    async with reporter(settings) as r:
        created = await r.created(
            "sbx-contract-1",
            project_id="proj-42",
            user_id="user-7",
            template="code-interpreter-v1",
            idle_timeout_s=900,
            metadata={"plan": "pro"},
        )
        await r.created("sbx-contract-2", project_id="p", user_id="u", template="base")
        r.activity("sbx-contract-1", "preview")
        await r.flush()
        killed = await r.killed("sbx-contract-1", reason="project deleted")
        await r.killed("sbx-contract-2")
        with pytest.raises(pydantic.ValidationError):
            r.activity("Not A Sandbox Id", "terminal")
        with pytest.raises(pydantic.ValidationError):
            await r.created("sbx-contract-3", project_id="p", user_id="u", template="base", idle_timeout_s=5)
        # within the contract, but over the 16 KiB that ingest takes: refused here, not dead-lettered there
        metadata = {f"k{i:02d}-" + "x" * 60: "\N{GRINNING FACE}" * 256 for i in range(16)}
        with pytest.raises(ReporterError, match=str(MAX_BODY_BYTES)):
            await r.created("sbx-contract-4", project_id="p", user_id="u", template="base", metadata=metadata)
    messages = await taken(channel, Names(settings.topology_prefix).events_queue, 5)
    assert len(messages) == 5
    kinds: Counter[str] = Counter()
    for msg in messages:
        event = EVENT_ADAPTER.validate_json(msg.body, context={"now": datetime.now(UTC)})
        kinds[event.type] += 1
        assert msg.routing_key == event.type == msg.type
        assert msg.message_id == str(event.event_id)
        assert msg.app_id == "builder-api"
        assert msg.content_type == "application/json"
        assert msg.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert len(msg.body) <= MAX_BODY_BYTES
        assert "null" not in msg.body.decode()
    assert kinds == {"sandbox.created": 2, "sandbox.activity": 1, "sandbox.killed": 2}
    ids = {orjson.loads(msg.body)["event_id"] for msg in messages}
    assert {str(created), str(killed)} <= ids


async def test_a_full_buffer_refuses_new_events_with_a_clear_error(
    settings: Settings, channel: AbstractChannel
) -> None:
    async with reporter(settings, max_buffer=5, activity_interval=60) as r:
        for i in range(5):
            r.activity(f"sbx-buffer-{i}", "file")  # no await in between: nothing is sent yet
        r.activity("sbx-buffer-0", "agent")  # folded into the pending one: takes no room
        with pytest.raises(BufferFull, match="max_buffer=5"):
            r.activity("sbx-buffer-5", "file")
        with pytest.raises(BufferFull):
            await r.created("sbx-buffer-6", project_id="p", user_id="u", template="base")
        assert r.buffered == 5
        await r.flush()
        assert r.buffered == 0
        r.activity("sbx-buffer-5", "file")
    messages = await taken(channel, Names(settings.topology_prefix).events_queue, 6)
    assert sorted(EVENT_ADAPTER.validate_json(m.body).sandbox_id for m in messages) == [
        f"sbx-buffer-{i}" for i in range(6)
    ]

"""The reporter through a restart of its broker: no event confirmed to the caller is lost.

The test runs a private RabbitMQ node that it starts, restarts and kills itself.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from pathlib import Path

import aio_pika
import orjson
import pytest

from consumer.broker import Names, declare_topology
from consumer.reporter import Reporter, Undelivered
from consumer.settings import load_settings

from ..helpers.rabbitmq_nodes import private_nodes
from ..helpers.waiting import wait_for

pytestmark = pytest.mark.isolated  # a private RabbitMQ node only


async def test_confirmed_events_survive_a_broker_restart(tmp_path: Path) -> None:
    """Events go on through a restart of the broker; none confirmed to the caller is lost."""
    with private_nodes(tmp_path) as (node,):
        await node.start()
        connection = await aio_pika.connect(node.url())
        async with connection:
            await declare_topology(await connection.channel(), load_settings(amqp_url=node.url()))

        confirmed: list[uuid.UUID] = []
        failures: list[BaseException] = []
        stop = asyncio.Event()
        r = Reporter(node.url(), app_id="restart-test", retry_delay=0.1, publish_timeout=3, close_timeout=60)
        await r.start()

        async def producer(n: int) -> None:
            i = 0
            while not stop.is_set():
                sandbox = f"sbx-restart-{n}-{i}"
                try:
                    confirmed.append(await r.created(sandbox, project_id="p", user_id="u", template="base"))
                    r.activity(sandbox, "terminal")
                except Exception as exc:
                    failures.append(exc)
                i += 1

        producers = [asyncio.create_task(producer(n)) for n in range(20)]
        try:
            await wait_for(lambda: len(confirmed) >= 300, timeout=30, what="events before the restart")
            before = len(confirmed)
            await node.stop()
            await node.start()
            await wait_for(
                lambda: len(confirmed) >= before + 300, timeout=60, what="events after the restart"
            )
        finally:
            stop.set()
            await asyncio.gather(*producers)
        await r.close()
        assert not failures, failures[:3]
        assert r.stats.retried > 0, "the restart hit no publish: the test proved nothing"

        connection = await aio_pika.connect(node.url())
        async with connection:
            ch = await connection.channel()
            queue = await ch.declare_queue(Names("").events_queue, passive=True)
            delivered: Counter[str] = Counter()
            while (msg := await queue.get(no_ack=True, fail=False)) is not None:
                delivered[orjson.loads(msg.body)["event_id"]] += 1
        missing = [event_id for event_id in confirmed if str(event_id) not in delivered]
        assert not missing, f"{len(missing)} of {len(confirmed)} confirmed events were lost"

        # what cannot be confirmed before close is reported, not dropped in silence
        r = Reporter(node.url(), app_id="restart-test", retry_delay=0.1, publish_timeout=1, close_timeout=1)
        await r.start()
        node.kill()
        pending = asyncio.create_task(r.created("sbx-never", project_id="p", user_id="u", template="base"))
        await wait_for(lambda: r.buffered > 0, timeout=10, what="the event in the buffer")
        with pytest.raises(Undelivered) as undelivered:
            await r.close()
        assert [event.sandbox_id for event in undelivered.value.events] == ["sbx-never"]
        with pytest.raises(Undelivered):
            await pending

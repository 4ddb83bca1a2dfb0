"""The shared broker as a producer and an operator see it: confirmed publishes, depths, dead letters."""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import aio_pika
import orjson

from consumer.broker import Names, declare_topology, message, publish_all
from consumer.settings import Settings

from .config import AMQP_URL
from .waiting import wait_for

Channel = aio_pika.abc.AbstractChannel
Body = dict[str, Any] | bytes


async def publish_confirmed(
    exchange: aio_pika.abc.AbstractExchange, items: Iterable[tuple[str, aio_pika.Message]]
) -> None:
    """Publish with confirms, as an at-least-once producer does: raise unless every message was taken."""
    confirmed = await publish_all(exchange, items)
    if not all(confirmed):
        raise aio_pika.exceptions.DeliveryError(None, None)  # type: ignore[arg-type]


async def publish(
    channel: Channel, settings: Settings, bodies: Sequence[Body], routing_key: str | None = None
) -> None:
    """Publish events (dicts, or raw bytes for invalid ones) to sandbox.events with confirms."""
    exchange = await channel.get_exchange(Names(settings.topology_prefix).events_exchange)
    items = []
    for body in bodies:
        if isinstance(body, bytes):
            items.append((routing_key or "sandbox.activity", message(body)))
        else:
            items.append((routing_key or body.get("type", "sandbox.activity"), message(orjson.dumps(body))))
    await publish_confirmed(exchange, items)


async def declare(settings: Settings) -> None:
    """Declare the test's topology through a connection of its own."""
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        await declare_topology(await connection.channel(), settings)


async def publish_fresh(settings: Settings, bodies: Sequence[Body]) -> None:
    """Declare the topology and publish through a connection of its own (a restart breaks old ones)."""
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await declare_topology(channel, settings)
        await publish(channel, settings, bodies)


async def queue_ready(channel: Channel, name: str) -> int:
    """Messages ready in a queue."""
    queue = await channel.declare_queue(name, passive=True)
    return int(queue.declaration_result.message_count or 0)


async def consumers(channel: Channel, name: str) -> int:
    """Consumers of a queue."""
    queue = await channel.declare_queue(name, passive=True)
    return int(queue.declaration_result.consumer_count or 0)


async def ready(name: str) -> int | None:
    """Messages ready in a queue, through a connection of its own; None while the broker does not answer."""
    try:
        connection = await aio_pika.connect(AMQP_URL, timeout=5)
    except Exception:
        return None
    async with connection:
        return await queue_ready(await connection.channel(), name)


async def accepts_clients(url: str) -> bool:
    """True when a client can connect to the broker at ``url`` and open a channel."""
    try:
        connection = await aio_pika.connect(url, timeout=3)
    except Exception:
        return False
    try:
        await (await connection.channel()).close()
        return True
    except Exception:
        return False
    finally:
        with contextlib.suppress(Exception):
            await connection.close()


async def take_all(channel: Channel, queue: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Take every message of a queue (a dead-letter queue, say)."""
    taken = []
    source = await channel.get_queue(queue)
    while (msg := await source.get(fail=False, no_ack=True)) is not None:
        taken.append(msg)
    return taken


async def dead_lettered_by_the_broker(
    channel: Channel, settings: Settings, items: list[tuple[str, aio_pika.Message]]
) -> aio_pika.abc.AbstractQueue:
    """Publish ``items`` to sandbox.events and have the broker dead-letter them (its delivery limit).

    The queues are declared again with a delivery limit of 1; a consumer that
    keeps crashing returns each message until the broker gives up on it.
    Returns the events queue.
    """
    names = Names(settings.topology_prefix)
    for queue in (names.events_queue, names.pause_queue):
        await channel.queue_delete(queue)
    await declare_topology(channel, settings.model_copy(update={"delivery_limit": 1}))
    await publish_confirmed(await channel.get_exchange(names.events_exchange), items)
    events = await channel.get_queue(names.events_queue)
    for _ in range(10):  # the limit is 1: the second return is the last
        if (msg := await events.get(fail=False)) is None:
            break
        await msg.nack(requeue=True)
    await wait_for(lambda: queue_ready(channel, names.events_dlq), what="the broker's dead letters")
    return events


# a queue that refuses every publish ------------------------------------------------------------


async def rabbitmqctl(*args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        "rabbitmqctl", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {err.decode()[-300:]}")
    return out.decode()


PROBE = b"refusing-queue probe"


async def _refuses_publishing(queue: str) -> bool:
    """Publish a probe to ``queue``; True when the broker refuses it (a nack)."""
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        try:
            await channel.default_exchange.publish(aio_pika.Message(PROBE), routing_key=queue)
        except aio_pika.exceptions.DeliveryError:
            return True
        return False


async def _takes_publishing(queue: str) -> bool:
    return not await _refuses_publishing(queue)


async def _drop_probes(queue: str) -> None:
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        source = await channel.get_queue(queue)
        while (msg := await source.get(fail=False)) is not None:
            if msg.body == PROBE:
                await msg.ack()
        # closing the channel returns every other message to the queue


@contextlib.asynccontextmanager
async def refusing_queue(queue: str) -> AsyncIterator[None]:
    """``queue`` refuses every publish (a nack, as a full queue does) inside the block.

    A policy with max-length 0 and reject-publish; a quorum queue refuses once
    it is over its limit, so a probe message fills it first. Policies apply
    asynchronously: the block starts once a publish is refused and ends once
    one is taken again; the probes are then removed.
    """
    name = "test-" + uuid.uuid4().hex[:8]
    pattern = "^" + re.escape(queue) + "$"
    definition = orjson.dumps({"max-length": 0, "overflow": "reject-publish"}).decode()
    await rabbitmqctl("set_policy", name, pattern, definition, "--apply-to", "queues")
    try:
        await wait_for(lambda: _refuses_publishing(queue), timeout=30, what=f"{queue} refusing")
        yield
    finally:
        await rabbitmqctl("clear_policy", name)
        await wait_for(lambda: _takes_publishing(queue), timeout=30, what=f"{queue} taking messages again")
        await _drop_probes(queue)

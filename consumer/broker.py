"""RabbitMQ: the names, the topology (declared idempotently), connections and publishing.

    sandbox.events (topic) --sandbox.*--> autopause.events (quorum) --DLX--> autopause.events.dlq
    autopause.commands (direct) --sandbox.pause--> autopause.pause (quorum) --DLX--> autopause.pause.dlq
    sandbox.lifecycle (topic): outcome events for app services

Every name carries the ``topology_prefix`` setting, so deployments (and tests)
can share one broker without seeing each other.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import aio_pika
import aiormq
import orjson
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractQueue,
    AbstractRobustConnection,
    DeliveryMode,
)

from consumer.errors import BrokerUnavailable
from consumer.settings import Settings
from schemas import EVENT_TYPES

log = logging.getLogger(__name__)

REASON_HEADER = "x-autopause-reason"
DETAIL_HEADER = "x-autopause-detail"
ROUTING_KEY_HEADER = "x-autopause-routing-key"
PAUSE_ROUTING_KEY = "sandbox.pause"

UNAVAILABLE = (
    OSError,
    ConnectionError,
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelInvalidStateError,
    asyncio.TimeoutError,
)


@dataclass(frozen=True)
class Names:
    """Exchange and queue names for one topology prefix."""

    prefix: str = ""

    def _n(self, name: str) -> str:
        return f"{self.prefix}{name}"

    @property
    def events_exchange(self) -> str:
        return self._n("sandbox.events")

    @property
    def events_queue(self) -> str:
        return self._n("autopause.events")

    @property
    def dead_letter_exchange(self) -> str:
        return self._n("autopause.dlx")

    @property
    def events_dlq(self) -> str:
        return self._n("autopause.events.dlq")

    @property
    def commands_exchange(self) -> str:
        return self._n("autopause.commands")

    @property
    def pause_queue(self) -> str:
        return self._n("autopause.pause")

    @property
    def pause_dlq(self) -> str:
        return self._n("autopause.pause.dlq")

    @property
    def lifecycle_exchange(self) -> str:
        return self._n("sandbox.lifecycle")

    def queues(self) -> list[str]:
        return [self.events_queue, self.events_dlq, self.pause_queue, self.pause_dlq]

    def exchanges(self) -> list[str]:
        return [
            self.events_exchange,
            self.dead_letter_exchange,
            self.commands_exchange,
            self.lifecycle_exchange,
        ]


def connection_name(role: str) -> str:
    """What the management UI shows for a connection: role, host and pid."""
    return f"autopause {role} {socket.gethostname()} pid {os.getpid()}"


async def connect(settings: Settings, role: str, *, timeout: float = 10) -> AbstractRobustConnection:
    """A robust connection (it reconnects by itself), named for the management UI."""
    try:
        return await aio_pika.connect_robust(
            settings.amqp_url.get_secret_value(),
            timeout=timeout,
            client_properties={"connection_name": connection_name(role)},
        )
    except UNAVAILABLE as exc:
        raise BrokerUnavailable(f"RabbitMQ unreachable: {type(exc).__name__}: {exc}") from exc


async def declare_topology(channel: AbstractChannel, settings: Settings) -> None:
    """Declare every exchange, queue and binding; safe to run from every replica at every start."""
    names = Names(settings.topology_prefix)
    durable: dict[str, Any] = {"durable": True}
    events = await channel.declare_exchange(names.events_exchange, aio_pika.ExchangeType.TOPIC, **durable)
    dlx = await channel.declare_exchange(names.dead_letter_exchange, aio_pika.ExchangeType.DIRECT, **durable)
    commands = await channel.declare_exchange(
        names.commands_exchange, aio_pika.ExchangeType.DIRECT, **durable
    )
    await channel.declare_exchange(names.lifecycle_exchange, aio_pika.ExchangeType.TOPIC, **durable)

    for dlq, key in ((names.events_dlq, "events"), (names.pause_dlq, "pause")):
        queue = await channel.declare_queue(dlq, durable=True, arguments={"x-queue-type": "quorum"})
        await queue.bind(dlx, routing_key=key)

    events_args: dict[str, Any] = {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": names.dead_letter_exchange,
        "x-dead-letter-routing-key": "events",
        "x-delivery-limit": settings.delivery_limit,
    }
    if settings.events_queue_max_length:
        events_args["x-max-length"] = settings.events_queue_max_length
        events_args["x-overflow"] = "reject-publish"
    queue = await channel.declare_queue(names.events_queue, durable=True, arguments=events_args)
    for event_type in EVENT_TYPES:
        await queue.bind(events, routing_key=event_type)

    pause = await channel.declare_queue(
        names.pause_queue,
        durable=True,
        arguments={
            "x-queue-type": "quorum",
            "x-dead-letter-exchange": names.dead_letter_exchange,
            "x-dead-letter-routing-key": "pause",
            "x-delivery-limit": settings.delivery_limit,
        },
    )
    await pause.bind(commands, routing_key=PAUSE_ROUTING_KEY)


async def delete_topology(channel: AbstractChannel, prefix: str) -> None:
    """Remove every queue and exchange of a prefix (tests and teardown)."""
    names = Names(prefix)
    for queue in names.queues():
        await channel.queue_delete(queue)
    for exchange in names.exchanges():
        await channel.exchange_delete(exchange)


def message(
    body: bytes, *, message_id: str | None = None, headers: dict[str, Any] | None = None
) -> aio_pika.Message:
    """A persistent JSON message."""
    return aio_pika.Message(
        body,
        content_type="application/json",
        delivery_mode=DeliveryMode.PERSISTENT,
        message_id=message_id,
        headers=headers,
    )


def encode(payload: Any) -> bytes:
    return orjson.dumps(payload)


async def publish_all(
    exchange: AbstractExchange, items: Iterable[tuple[str, aio_pika.Message]], *, window: int = 256
) -> None:
    """Publish with confirms, ``window`` in flight at once; raise if any is not confirmed."""
    pending: list[asyncio.Future[Any]] = []
    for routing_key, msg in items:
        pending.append(asyncio.ensure_future(exchange.publish(msg, routing_key=routing_key)))
        if len(pending) >= window:
            await asyncio.gather(*pending)
            pending.clear()
    if pending:
        await asyncio.gather(*pending)


async def queue_depth(connection: AbstractRobustConnection, queue: str) -> tuple[int, int]:
    """(messages ready, consumers) of a queue, by a passive declare on a throwaway channel."""
    channel = await connection.channel()
    try:
        declared: AbstractQueue = await channel.declare_queue(queue, passive=True)
        result = declared.declaration_result
        return int(result.message_count or 0), int(result.consumer_count or 0)
    finally:
        if not channel.is_closed:
            await channel.close()

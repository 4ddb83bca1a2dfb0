"""Names, the declared topology, and what a message autopause publishes looks like.

    sandbox.events (topic) --sandbox.*, autopause.probe--> autopause.events (quorum) --DLX-->
        autopause.events.dlq
    autopause.commands (direct) --sandbox.pause--> autopause.pause (quorum) --DLX--> autopause.pause.dlq
    sandbox.lifecycle (topic): outcome events for app services

Every name carries the ``topology_prefix`` setting, so deployments (and tests)
can share one broker without seeing each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, DeliveryMode

from consumer.settings import Settings
from schemas import EVENT_TYPES

REASON_HEADER = "x-autopause-reason"
DETAIL_HEADER = "x-autopause-detail"
ROUTING_KEY_HEADER = "x-autopause-routing-key"
OWN_HEADER_PREFIX = "x-autopause-"
PAUSE_ROUTING_KEY = "sandbox.pause"
PROBE_ROUTING_KEY = "autopause.probe"
# What RabbitMQ writes on a message it dead-letters itself.
BROKER_DEATH_HEADERS = frozenset(
    {
        "x-death",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-first-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
        "x-last-death-exchange",
    }
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

    def dead_letter_key(self, queue: str) -> str:
        """The dead-letter routing key of a consumed queue ("events" or "pause")."""
        return "events" if queue == self.events_queue else "pause"


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
        dlq_args: dict[str, Any] = {"x-queue-type": "quorum"}
        if settings.dead_letter_max_length:
            dlq_args["x-max-length"] = settings.dead_letter_max_length
            dlq_args["x-overflow"] = "reject-publish"
        queue = await channel.declare_queue(dlq, durable=True, arguments=dlq_args)
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
    for routing_key in (*EVENT_TYPES, PROBE_ROUTING_KEY):
        await queue.bind(events, routing_key=routing_key)

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


def queue_limits(settings: Settings) -> dict[str, int]:
    """The queues with a cap on their length, and that cap (from the settings; see settings.py)."""
    names = Names(settings.topology_prefix)
    limits = {names.events_queue: settings.events_queue_max_length}
    limits |= dict.fromkeys((names.events_dlq, names.pause_dlq), settings.dead_letter_max_length)
    return {queue: cap for queue, cap in limits.items() if cap > 0}


async def delete_topology(channel: AbstractChannel, prefix: str) -> None:
    """Remove every queue and exchange of a prefix (tests and teardown)."""
    names = Names(prefix)
    for queue in names.queues():
        await channel.queue_delete(queue)
    for exchange in names.exchanges():
        await channel.exchange_delete(exchange)

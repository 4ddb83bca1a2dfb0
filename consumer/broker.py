"""RabbitMQ, and the one boundary that consumes, acks, publishes and dead-letters.

    sandbox.events (topic) --sandbox.*, autopause.probe--> autopause.events (quorum) --DLX-->
        autopause.events.dlq
    autopause.commands (direct) --sandbox.pause--> autopause.pause (quorum) --DLX--> autopause.pause.dlq
    sandbox.lifecycle (topic): outcome events for app services

Every name carries the ``topology_prefix`` setting, so deployments (and tests)
can share one broker without seeing each other.

The roles never hold a driver exception or an ack: :class:`Broker` hands them
a :class:`Consumer` (deliveries in, settled deliveries acked, dead letters
published with confirms) and :class:`Publisher` objects. Every aio-pika and
aiormq error is translated here: :class:`~consumer.errors.BrokerUnavailable`
for "try again later", :class:`~consumer.errors.ConfigError` for a topology or
permission that cannot work.

A delivery is acked only once it is *settled*: its batch committed, or its dead
letter confirmed. A multiple-ack never reaches past the lowest delivery tag
that is not settled (:func:`ack_plan`), and deliveries of a channel that has
closed are never acked: the broker delivers them again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractRobustChannel,
    AbstractRobustConnection,
    DeliveryMode,
)
from aiormq.abc import DeliveredMessage

from consumer import metrics
from consumer.errors import BrokerUnavailable, ConfigError, NotFound
from consumer.settings import Settings
from schemas import EVENT_TYPES

log = logging.getLogger(__name__)

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

# What "the broker or the channel went away" looks like from aio-pika and aiormq.
_UNAVAILABLE = (
    OSError,
    ConnectionError,
    asyncio.TimeoutError,
    aiormq.exceptions.AMQPError,
)
_REFUSED = (aiormq.exceptions.ChannelPreconditionFailed, aiormq.exceptions.ChannelAccessRefused)


@contextlib.contextmanager
def translated(what: str) -> Iterator[None]:
    """Turn driver exceptions into the service's own (see the module docstring)."""
    try:
        yield
    except _REFUSED as exc:
        raise ConfigError(f"RabbitMQ refused {what}: {exc}") from None
    except aiormq.exceptions.ChannelNotFoundEntity as exc:
        raise NotFound(f"RabbitMQ: {what}: {exc}") from None
    except _UNAVAILABLE as exc:
        raise BrokerUnavailable(f"RabbitMQ unavailable ({what}): {type(exc).__name__}: {exc}") from exc
    except RuntimeError as exc:
        # aio-pika reports a connection or channel that is closed or reconnecting with a bare
        # RuntimeError; inside these blocks nothing else raises one
        raise BrokerUnavailable(f"RabbitMQ unavailable ({what}): {exc}") from exc


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


def connection_name(role: str) -> str:
    """What the management UI shows for a connection: role, host and pid."""
    return f"autopause {role} {socket.gethostname()} pid {os.getpid()}"


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


async def delete_topology(channel: AbstractChannel, prefix: str) -> None:
    """Remove every queue and exchange of a prefix (tests and teardown)."""
    names = Names(prefix)
    for queue in names.queues():
        await channel.queue_delete(queue)
    for exchange in names.exchanges():
        await channel.exchange_delete(exchange)


async def publish_all(
    exchange: AbstractExchange,
    items: Iterable[tuple[str, aio_pika.Message]],
    *,
    window: int = 256,
    mandatory: bool = True,
) -> list[bool]:
    """Publish ``window`` at a time; per message, True when confirmed (always, without confirms).

    A message the broker refuses (a nack: a full queue, say) or returns (no
    queue for it, on a channel that raises on returns) comes back False; a
    channel or connection that goes away raises its driver error.
    """
    results: list[bool] = []
    pending: list[Awaitable[Any]] = []

    async def drain() -> None:
        for outcome in await asyncio.gather(*pending, return_exceptions=True):
            if isinstance(outcome, aiormq.exceptions.DeliveryError | aiormq.exceptions.PublishError):
                results.append(False)
            elif isinstance(outcome, BaseException):
                raise outcome
            else:
                results.append(True)
        pending.clear()

    for routing_key, msg in items:
        pending.append(exchange.publish(msg, routing_key=routing_key, mandatory=mandatory))
        if len(pending) >= window:
            await drain()
    if pending:
        await drain()
    return results


def ack_plan(outstanding: set[int], settling: set[int]) -> tuple[int | None, list[int]]:
    """Pure: how to ack ``settling`` out of the tags ``outstanding`` on one channel.

    Returns (tag for one multiple-ack, or None; tags to ack one by one). The
    multiple-ack covers only tags below the lowest outstanding tag that is not
    being settled, so it can never ack a delivery that is still in hand.
    """
    held = outstanding - settling
    lowest_held = min(held) if held else None
    below = [t for t in settling if lowest_held is None or t < lowest_held]
    above = sorted(t for t in settling if lowest_held is not None and t > lowest_held)
    if len(below) > 1:
        return max(below), above
    return None, sorted(below) + above


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message as the broker delivered it to a :class:`Consumer`."""

    body: bytes
    routing_key: str
    tag: int
    epoch: int  # which channel of the consumer it came on; a closed channel's tags are void
    redelivered: bool
    properties: Any  # the AMQP properties (aiormq's), read through the accessors below

    @property
    def headers(self) -> dict[str, Any]:
        return dict(self.properties.headers or {})

    @property
    def message_id(self) -> str | None:
        value = self.properties.message_id
        return str(value) if value is not None else None

    @property
    def producer(self) -> str:
        """Who published it: the ``app_id`` property, else the broker-checked ``user_id``."""
        return str(self.properties.app_id or self.properties.user_id or "unknown")


@dataclass(frozen=True)
class DeadLetter:
    delivery: Delivery
    reason: str
    detail: str


@dataclass(frozen=True)
class QueueState:
    ready: int
    consumers: int


class Consumer:
    """One queue consumed on its own channel; ``on_delivery`` sees every message.

    Deliveries stay in hand until :meth:`settle` or :meth:`dead_letter`; on
    :meth:`close` whatever is still in hand goes back to the broker.
    """

    def __init__(
        self, broker: Broker, queue: str, prefetch: int, on_delivery: Callable[[Delivery], None], tag: str
    ) -> None:
        self._broker = broker
        self._queue = queue
        self._prefetch = prefetch
        self._on_delivery = on_delivery
        self._tag = tag
        self._channel: AbstractRobustChannel | None = None
        self._underlay: aiormq.abc.AbstractChannel | None = None
        self._dead_letters: Publisher | None = None
        self._epoch = 0
        self._outstanding: set[int] = set()
        self._redelivered: set[int] = set()

    @property
    def unsettled(self) -> int:
        """Deliveries in hand on the current channel."""
        return len(self._outstanding)

    @property
    def unsettled_redelivered(self) -> int:
        """Of those, deliveries the broker had delivered before (to anyone)."""
        return len(self._redelivered)

    def holds(self, delivery: Delivery) -> bool:
        """True while ``delivery`` can still be settled (its channel is the current one)."""
        return delivery.epoch == self._epoch and delivery.tag in self._outstanding

    async def start(self) -> None:
        with translated(f"consuming {self._queue}"):
            channel = await self._broker.connection.channel(publisher_confirms=False)
            await channel.set_qos(prefetch_count=self._prefetch)
            self._channel = channel
            await self._subscribe()
            channel.reopen_callbacks.add(self._reopened)

    async def _subscribe(self) -> None:
        assert self._channel is not None
        self._underlay = await self._channel.get_underlay_channel()
        self._epoch += 1
        self._outstanding.clear()  # the old channel's deliveries are the broker's again
        self._redelivered.clear()
        epoch = self._epoch

        async def deliver(msg: DeliveredMessage) -> None:
            frame = msg.delivery
            assert isinstance(frame, aiormq.spec.Basic.Deliver)
            tag = int(frame.delivery_tag or 0)
            redelivered = bool(frame.redelivered)
            self._outstanding.add(tag)
            if redelivered:
                self._redelivered.add(tag)
            self._on_delivery(
                Delivery(
                    msg.body,
                    frame.routing_key or "",
                    tag,
                    epoch,
                    redelivered,
                    msg.header.properties,
                )
            )

        await self._underlay.basic_consume(self._queue, deliver, consumer_tag=self._tag)

    async def _reopened(self, _: Any) -> None:
        await self._subscribe()
        log.warning("consuming again after a reconnect", extra={"action": "broker.resubscribe"})

    async def settle(self, deliveries: Iterable[Delivery]) -> None:
        """Ack exactly ``deliveries`` (their work is done); void ones are left to the broker."""
        tags = set()
        for delivery in deliveries:
            if delivery.epoch == self._epoch and delivery.tag in self._outstanding:
                tags.add(delivery.tag)
            else:
                metrics.ACKS_VOID.inc()
        if not tags:
            return
        multiple, singles = ack_plan(self._outstanding, tags)
        self._outstanding -= tags
        self._redelivered -= tags
        underlay = self._underlay
        if underlay is None or underlay.is_closed:
            return
        try:
            if multiple is not None:
                await underlay.basic_ack(multiple, multiple=True)
            for tag in singles:
                await underlay.basic_ack(tag)
        except _UNAVAILABLE as exc:
            # the channel is gone, and with it these acks: the broker redelivers, the rules are idempotent
            log.warning(
                "acks lost with their channel", extra={"action": "broker.ack_lost", "error": str(exc)}
            )

    async def dead_letter(self, items: Sequence[DeadLetter]) -> list[DeadLetter]:
        """Publish ``items`` to the dead-letter exchange with confirms and settle those confirmed.

        Returns the items not confirmed, still in hand (a full dead-letter
        queue, say); items whose channel closed meanwhile are dropped from the
        answer, since the broker delivers them again.
        """
        key = self._broker.names.dead_letter_key(self._queue)
        if self._dead_letters is None:
            self._dead_letters = await self._broker.publisher(
                self._broker.names.dead_letter_exchange, confirm=True
            )
        with translated("dead-lettering"):
            confirmed = await self._dead_letters.publish_messages(
                [(key, _dead_letter_message(d)) for d in items]
            )
        if not all(confirmed):
            # A quorum queue that refused a channel's publishes (full) may keep refusing that
            # channel after it has room again; the next try goes out on a fresh one.
            await self._dead_letters.close()
            self._dead_letters = None
        done = [d.delivery for d, ok in zip(items, confirmed, strict=True) if ok]
        await self.settle(done)
        for item, ok in zip(items, confirmed, strict=True):
            if ok:
                metrics.DEAD_LETTERS.labels(key, item.reason).inc()
        return [d for d, ok in zip(items, confirmed, strict=True) if not ok and self.holds(d.delivery)]

    async def cancel(self) -> None:
        """Stop new deliveries; those in hand stay in hand."""
        if self._underlay is not None and not self._underlay.is_closed:
            with contextlib.suppress(*_UNAVAILABLE):
                await self._underlay.basic_cancel(self._tag)

    async def close(self) -> None:
        """Close the channel: nothing more is acked, what is in hand goes back to the broker."""
        if self._dead_letters is not None:
            await self._dead_letters.close()
        if self._channel is None:
            return
        self._channel.reopen_callbacks.discard(self._reopened)
        if not self._channel.is_closed:
            with contextlib.suppress(*_UNAVAILABLE):
                await self._channel.close()
        self._outstanding.clear()
        self._redelivered.clear()


def producer_headers(headers: dict[str, Any]) -> dict[str, Any]:
    """The headers a producer may set: neither ours (``x-autopause-*``) nor the broker's death record.

    A producer can send either kind; kept, they would pass for the real thing
    once the message is a dead letter. So our dead letters never carry an
    ``x-death``, and one that does was made by RabbitMQ.
    """
    return {
        key: _portable(value)
        for key, value in headers.items()
        if not str(key).lower().startswith(OWN_HEADER_PREFIX) and str(key).lower() not in BROKER_DEATH_HEADERS
    }


def _dead_letter_message(item: DeadLetter) -> aio_pika.Message:
    """The message as it came, with our reason and without headers that could pass for ours."""
    headers = producer_headers(item.delivery.headers)
    headers[REASON_HEADER] = item.reason
    headers[DETAIL_HEADER] = item.detail
    headers[ROUTING_KEY_HEADER] = item.delivery.routing_key
    return message(item.delivery.body, message_id=item.delivery.message_id, headers=headers)


def _portable(value: Any) -> Any:
    """A header value that can be published again: bytes that are not UTF-8 become text."""
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "backslashreplace")
    if isinstance(value, dict):
        return {str(k): _portable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_portable(v) for v in value]
    return value


@dataclass(frozen=True)
class Outgoing:
    routing_key: str
    body: bytes
    message_id: str | None = None


class Publisher:
    """Publishes to one exchange, with or without publisher confirms."""

    def __init__(self, channel: AbstractRobustChannel, exchange: AbstractExchange, confirm: bool) -> None:
        self._channel = channel
        self._exchange = exchange
        self._confirm = confirm

    async def publish(self, items: Sequence[Outgoing]) -> list[bool]:
        """Per item, True once the broker confirmed it (with confirms) or took it (without)."""
        return await self.publish_messages(
            [(o.routing_key, message(o.body, message_id=o.message_id)) for o in items]
        )

    async def publish_messages(self, items: Sequence[tuple[str, aio_pika.Message]]) -> list[bool]:
        # With confirms, a message no queue takes counts as not published; without them the
        # messages are announcements, and nobody listening is normal.
        with translated(f"publishing to {self._exchange.name}"):
            return await publish_all(self._exchange, items, mandatory=self._confirm)

    async def close(self) -> None:
        if not self._channel.is_closed:
            with contextlib.suppress(*_UNAVAILABLE):
                await self._channel.close()


@contextlib.asynccontextmanager
async def connected(settings: Settings, role: str) -> AsyncIterator[Broker]:
    """A connection for one command, closed afterwards; it declares nothing."""
    opened = await Broker.connect(settings, role)
    try:
        yield opened
    finally:
        await opened.close()


class Broker:
    """The process's one RabbitMQ connection (it reconnects by itself) and what is made from it."""

    def __init__(self, connection: AbstractRobustConnection, settings: Settings) -> None:
        self.connection = connection
        self.settings = settings
        self.names = Names(settings.topology_prefix)
        self._inspector: AbstractChannel | None = None

    @classmethod
    async def connect(cls, settings: Settings, role: str, *, timeout: float = 10) -> Broker:
        """Connect, named for the management UI; BrokerUnavailable when RabbitMQ is not there."""
        with translated("the connection"):
            connection = await aio_pika.connect_robust(
                settings.amqp_url.get_secret_value(),
                timeout=timeout,
                client_properties={"connection_name": connection_name(role)},
            )
        return cls(connection, settings)

    @property
    def is_open(self) -> bool:
        return not self.connection.is_closed

    async def declare_topology(self) -> None:
        with translated("declaring the topology"):
            channel = await self.connection.channel()
            try:
                await declare_topology(channel, self.settings)
            finally:
                if not channel.is_closed:
                    await channel.close()

    async def consumer(
        self, queue: str, *, prefetch: int, on_delivery: Callable[[Delivery], None], role: str
    ) -> Consumer:
        """A started consumer of ``queue`` with a tag the management UI shows."""
        tag = f"{connection_name(role).replace(' ', '-')}-{os.urandom(3).hex()}"
        consumer = Consumer(self, queue, prefetch, on_delivery, tag)
        await consumer.start()
        return consumer

    async def publisher(self, exchange: str, *, confirm: bool) -> Publisher:
        with translated(f"opening a publisher to {exchange}"):
            channel = await self.connection.channel(publisher_confirms=confirm, on_return_raises=confirm)
            target = await channel.get_exchange(exchange, ensure=False)
        return Publisher(channel, target, confirm)

    async def queue_state(self, queue: str) -> QueueState:
        """Messages ready in ``queue`` and its consumers, by a passive declare.

        The declares share one channel, opened again when a missing queue (the
        broker closes a channel on that) or a reconnect took it away.
        """
        with translated(f"reading the depth of {queue}"):
            if self._inspector is None or self._inspector.is_closed:
                self._inspector = await self.connection.channel()
            frame = await self._inspector.get_underlay_channel()
            result = await frame.queue_declare(queue, passive=True)
            return QueueState(int(result.message_count or 0), int(result.consumer_count or 0))

    async def close(self) -> None:
        with contextlib.suppress(*_UNAVAILABLE):
            await self.connection.close()

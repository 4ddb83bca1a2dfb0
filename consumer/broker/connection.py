"""The process's one RabbitMQ connection, and the consumers, publishers and depth reads made from it."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractRobustConnection

from consumer.broker.consuming import Consumer, Delivery
from consumer.broker.publishing import Publisher
from consumer.broker.topology import Names, declare_topology
from consumer.broker.translate import UNAVAILABLE, translated
from consumer.settings import Settings


def connection_name(role: str) -> str:
    """What the management UI shows for a connection: role, host and pid."""
    return f"autopause {role} {socket.gethostname()} pid {os.getpid()}"


@dataclass(frozen=True)
class QueueState:
    ready: int
    consumers: int


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
        with contextlib.suppress(*UNAVAILABLE):
            await self.connection.close()

"""Publishing: a window of messages at a time, with or without publisher confirms."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractExchange, AbstractRobustChannel

from consumer.broker.topology import message
from consumer.broker.translate import UNAVAILABLE, translated


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
            with contextlib.suppress(*UNAVAILABLE):
                await self._channel.close()

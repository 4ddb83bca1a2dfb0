"""Consuming: deliveries in hand until settled, acks that never reach past one in hand, dead letters.

A delivery is acked only once it is *settled*: its batch committed, or its dead
letter confirmed. A multiple-ack never reaches past the lowest delivery tag
that is not settled (:func:`ack_plan`), and deliveries of a channel that has
closed are never acked: the broker delivers them again.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractRobustChannel
from aiormq.abc import DeliveredMessage

from consumer import metrics
from consumer.broker.publishing import Publisher
from consumer.broker.topology import (
    BROKER_DEATH_HEADERS,
    DETAIL_HEADER,
    OWN_HEADER_PREFIX,
    REASON_HEADER,
    ROUTING_KEY_HEADER,
    message,
)
from consumer.broker.translate import UNAVAILABLE, translated

if TYPE_CHECKING:
    from consumer.broker.connection import Broker

log = logging.getLogger(__name__)


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
        except UNAVAILABLE as exc:
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
            with contextlib.suppress(*UNAVAILABLE):
                await self._underlay.basic_cancel(self._tag)

    async def close(self) -> None:
        """Close the channel: nothing more is acked, what is in hand goes back to the broker."""
        if self._dead_letters is not None:
            await self._dead_letters.close()
        if self._channel is None:
            return
        self._channel.reopen_callbacks.discard(self._reopened)
        if not self._channel.is_closed:
            with contextlib.suppress(*UNAVAILABLE):
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

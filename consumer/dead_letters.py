"""Dead letters for operators: read them, replay events after a fix, drop dead pause commands.

Who made a dead letter decides which headers tell the truth. autopause's own
(ingest's invalid events, a worker's invalid commands) carry
``x-autopause-reason`` and never an ``x-death``: both kinds are stripped from
what a producer sent (:func:`consumer.broker.producer_headers`). One with an
``x-death`` was made by RabbitMQ (most often after ``x-delivery-limit``
redeliveries), and then its ``x-autopause-*`` headers are the producer's own
and count for nothing.

Every command here reads a queue's depth first and handles at most that many
messages: what comes back meanwhile (an event that ingest rejects again goes
back to the dead-letter queue, with its new reason) waits for the next run.
Messages are taken with ``basic.get``; one that is not acked returns to the
queue when the channel closes, so reading never removes anything.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from aio_pika.abc import AbstractIncomingMessage, AbstractQueue

from consumer.broker import (
    DETAIL_HEADER,
    REASON_HEADER,
    ROUTING_KEY_HEADER,
    Broker,
    Names,
    connected,
    message,
    producer_headers,
    translated,
)
from consumer.errors import BrokerUnavailable, NotFound
from consumer.settings import Settings
from consumer.text import printable, printable_bytes
from schemas import EVENT_TYPES

# The most dead letters ``status`` reads to break them down by reason.
REASONS_READ = 1000
# Replayed events published per round of confirms.
REPLAY_WINDOW = 100


class DeadLetterQueue(StrEnum):
    """The two dead-letter queues, by the queue their messages died in."""

    EVENTS = "events"
    PAUSE = "pause"

    def queue(self, names: Names) -> str:
        return names.events_dlq if self is DeadLetterQueue.EVENTS else names.pause_dlq


@dataclass(frozen=True)
class DeadLetter:
    """One dead letter as it is in the queue: values from outside are kept raw here."""

    routing_key: str
    reason: str
    detail: str
    body: bytes
    headers: dict[str, Any]

    def as_json(self) -> dict[str, Any]:
        """Every text escaped for a terminal; ``body_base64`` holds the exact bytes."""
        return {
            "routing_key": printable(self.routing_key),
            "reason": printable(self.reason),
            "detail": printable(self.detail),
            "body": printable_bytes(self.body),
            "body_base64": base64.b64encode(self.body).decode(),
            "headers": _printable_value(self.headers),
        }


def _printable_value(value: Any) -> Any:
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, bytes | bytearray):
        return printable_bytes(bytes(value))
    if isinstance(value, dict):
        return {printable(str(k)): _printable_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_printable_value(v) for v in value]
    if value is None or isinstance(value, bool | int | float):
        return value
    return printable(str(value))


def _last_death(headers: dict[str, Any]) -> dict[str, Any] | None:
    """The broker's record of the latest death, when the broker made this dead letter."""
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        return deaths[0]
    return None


def dead_letter_reason(headers: dict[str, Any]) -> str:
    """Why a message was dead-lettered, from the headers of whoever made it. Pure."""
    death = _last_death(headers)
    if death is not None:
        why = str(death.get("reason", "") or "")
        return "delivery limit" if why == "delivery_limit" else f"broker: {why or 'unknown'}"
    reason = headers.get(REASON_HEADER)
    return str(reason) if reason else "unknown"


def original_routing_key(headers: dict[str, Any], routing_key: str) -> str:
    """The routing key the message had before it died. Pure."""
    death = _last_death(headers)
    if death is not None:
        keys = death.get("routing-keys")
        return str(keys[0]) if isinstance(keys, list) and keys else ""
    return str(headers.get(ROUTING_KEY_HEADER, "") or routing_key or "")


def _letter(msg: AbstractIncomingMessage) -> DeadLetter:
    headers = dict(msg.headers or {})
    made_by_broker = _last_death(headers) is not None
    return DeadLetter(
        original_routing_key(headers, msg.routing_key or ""),
        dead_letter_reason(headers),
        "" if made_by_broker else str(headers.get(DETAIL_HEADER, "") or ""),
        msg.body,
        headers,
    )


def _missing(queue: str) -> NotFound:
    return NotFound(
        f"RabbitMQ has no queue {queue}: no role has declared the topology yet,"
        " or AUTOPAUSE_TOPOLOGY_PREFIX is not the deployment's"
    )


@asynccontextmanager
async def _reading(opened: Broker, queue: str) -> AsyncIterator[AbstractQueue]:
    """``queue`` on a channel of its own; what is not acked goes back when the block ends."""
    with translated(f"reading {queue}"):
        channel = await opened.connection.channel()
    try:
        try:
            with translated(f"reading {queue}"):
                source = await channel.get_queue(queue, ensure=True)
        except NotFound:
            raise _missing(queue) from None
        yield source
    finally:
        if not channel.is_closed:
            with translated(f"closing the channel of {queue}"):
                await channel.close()


async def _depth(opened: Broker, queue: str) -> int:
    """Messages ready in ``queue`` now: the most a command handles in one run."""
    try:
        return (await opened.queue_state(queue)).ready
    except NotFound:
        raise _missing(queue) from None


async def count_reasons(opened: Broker, queue: str) -> dict[str, int]:
    """Dead letters of ``queue`` by reason (escaped), from the first REASONS_READ; none is removed."""
    counts: dict[str, int] = {}
    async with _reading(opened, queue) as source:
        with translated(f"reading {queue}"):
            for _ in range(REASONS_READ):
                msg = await source.get(fail=False)
                if msg is None:
                    break
                reason = printable(dead_letter_reason(dict(msg.headers or {})))
                counts[reason] = counts.get(reason, 0) + 1
    return counts


async def peek(settings: Settings, which: DeadLetterQueue, limit: int) -> list[DeadLetter]:
    """Up to ``limit`` dead letters, oldest first; they stay in the queue."""
    name = which.queue(Names(settings.topology_prefix))
    found: list[DeadLetter] = []
    async with connected(settings, "cli") as opened, _reading(opened, name) as source:
        with translated(f"reading {name}"):
            while len(found) < limit and (msg := await source.get(fail=False)) is not None:
                found.append(_letter(msg))
    return found


@dataclass(frozen=True)
class Replayed:
    """What ``dlq replay`` did with the events dead-letter queue."""

    queue: str
    found: int  # messages in it when the replay started
    replayed: int
    skipped: int  # no event routing key: the operator may publish only those, they stay


async def replay_events(settings: Settings, limit: int) -> Replayed:
    """Publish the events dead letters back to ``sandbox.events``, at most those there at the start.

    Each is acked once the broker confirmed its copy; a copy whose ack is lost
    (a connection that drops) is replayed twice, which the idempotent rules make
    harmless. Ingest validates them again and dead-letters any it still
    rejects, with the reason it has now.
    """
    names = Names(settings.topology_prefix)
    queue = names.events_dlq
    replayed = skipped = taken = 0
    async with connected(settings, "cli") as opened:
        found = await _depth(opened, queue)
        budget = min(found, limit)
        events = await opened.publisher(names.events_exchange, confirm=True)
        try:
            async with _reading(opened, queue) as source:
                while taken < budget:
                    window: list[tuple[str, AbstractIncomingMessage]] = []
                    with translated(f"reading {queue}"):
                        while len(window) < REPLAY_WINDOW and taken < budget:
                            msg = await source.get(fail=False)
                            if msg is None:
                                budget = taken
                                break
                            taken += 1
                            letter = _letter(msg)
                            if letter.routing_key not in EVENT_TYPES:
                                skipped += 1  # left unacked: back in the queue when the channel closes
                                continue
                            window.append((letter.routing_key, msg))
                    if not window:
                        continue
                    confirmed = await events.publish_messages(
                        [
                            (key, message(msg.body, message_id=msg.message_id, headers=_replay_headers(msg)))
                            for key, msg in window
                        ]
                    )
                    with translated(f"acking replayed messages of {queue}"):
                        for (_, msg), ok in zip(window, confirmed, strict=True):
                            if ok:
                                await msg.ack()
                                replayed += 1
                    if not all(confirmed):
                        raise BrokerUnavailable(
                            f"RabbitMQ refused replayed events after {replayed} of {budget}"
                            f" (is {names.events_queue} full?); the rest stay in {queue}"
                        )
        finally:
            await events.close()
    return Replayed(queue, found, replayed, skipped)


def _replay_headers(msg: AbstractIncomingMessage) -> dict[str, Any]:
    return producer_headers(dict(msg.headers or {}))


@dataclass(frozen=True)
class Dropped:
    """What ``dlq replay --queue pause`` did: dead pause commands acknowledged, none re-sent."""

    queue: str
    found: int
    dropped: int


async def drop_pause_commands(settings: Settings, limit: int) -> Dropped:
    """Acknowledge (drop) the dead pause commands there at the start, up to ``limit``.

    Operators may not publish pause commands, and need not: the scheduler sends
    the command again for every row still PAUSING when its lease runs out, with
    the row's generation, so a replayed copy could only be stale.
    """
    queue = Names(settings.topology_prefix).pause_dlq
    dropped = 0
    async with connected(settings, "cli") as opened:
        found = await _depth(opened, queue)
        async with _reading(opened, queue) as source:
            with translated(f"dropping dead pause commands of {queue}"):
                while dropped < min(found, limit) and (msg := await source.get(fail=False)) is not None:
                    await msg.ack()
                    dropped += 1
    return Dropped(queue, found, dropped)

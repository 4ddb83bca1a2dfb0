"""The ingest role: sandbox events from RabbitMQ into the session table.

Messages are parsed at the edge (size, JSON, contract) as they arrive, then
collected into a batch closed by size or by time. A batch is one Postgres
transaction (events coalesced per sandbox, the state machine applied), then
its invalid messages are dead-lettered with their reason and the whole batch
is acked with one multiple-ack. Nothing is acked before its commit, so a
crash anywhere means redelivery, never loss; the rules are idempotent, so
redelivery is harmless.

Deliveries are taken from aio-pika's underlying aiormq channel: profiling
showed aio-pika's per-message wrapper costing more CPU than all of the
parsing, deciding and writing done here (docs/benchmarks.md). aio-pika still
owns the connection, its recovery and the topology; the consumer is
registered again on every channel it reopens.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractExchange, AbstractRobustChannel, AbstractRobustConnection
from aio_pika.exceptions import AMQPError
from aiormq.abc import DeliveredMessage
from pydantic import ValidationError

from consumer import metrics
from consumer.broker import (
    DETAIL_HEADER,
    REASON_HEADER,
    ROUTING_KEY_HEADER,
    UNAVAILABLE,
    Names,
    connection_name,
    declare_topology,
    message,
    publish_all,
    queue_depth,
)
from consumer.errors import StoreRejected, StoreUnavailable
from consumer.health import Health
from consumer.settings import Settings
from consumer.state import Event, apply, coalesce
from consumer.store import Store
from schemas import EVENT_ADAPTER

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rejected:
    """A message that cannot be applied, and why."""

    reason: str
    detail: str


def parse(body: bytes, *, limit: int, context: dict[str, Any]) -> Event | Rejected:
    """bytes -> contract model, or the reason it is not one. Pure."""
    if len(body) > limit:
        return Rejected("too_large", f"{len(body)} bytes > {limit}")
    try:
        return EVENT_ADAPTER.validate_json(body, context=context)
    except ValidationError as exc:
        return _rejection(exc)


def _rejection(exc: ValidationError) -> Rejected:
    first = exc.errors(include_url=False, include_input=False)[0]
    kind, where = first["type"], first["loc"][1:]
    if kind in ("json_invalid", "json_type"):
        reason = "invalid_json"
    elif kind == "union_tag_invalid":
        reason = "unknown_type"
    elif kind == "union_tag_not_found":
        reason = "missing_type"
    elif kind in ("model_type", "dict_type") and not first["loc"]:
        reason = "not_an_object"
    else:
        reason = "invalid_event"
    detail = f"{'.'.join(str(p) for p in where) or 'body'}: {first['msg']}"
    if exc.error_count() > 1:
        detail += f" (+{exc.error_count() - 1} more)"
    return Rejected(reason, detail[:500])


@dataclass
class Batch:
    messages: list[DeliveredMessage] = field(default_factory=list)
    events: list[tuple[DeliveredMessage, Event]] = field(default_factory=list)
    rejected: list[tuple[DeliveredMessage, Rejected]] = field(default_factory=list)
    opened: float = 0.0

    def __len__(self) -> int:
        return len(self.messages)


class Ingest:
    """One ingest consumer: ``run()`` until ``stop`` is set (or, in burst mode, the queue is empty)."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        connection: AbstractRobustConnection,
        health: Health,
        *,
        burst: bool = False,
    ) -> None:
        self.settings = settings
        self.store = store
        self.connection = connection
        self.health = health
        self.burst = burst
        self.names = Names(settings.topology_prefix)
        self.batch = Batch()
        self.arrived = asyncio.Event()  # the batch got its first message
        self.full = asyncio.Event()  # the batch reached batch_size
        self.last_delivery = time.monotonic()
        self.default_timeout = timedelta(seconds=settings.default_idle_timeout)
        self.skew = timedelta(seconds=settings.clock_skew)
        self.tag = f"{connection_name('ingest').replace(' ', '-')}-{id(self):x}"
        self.context: dict[str, Any] = {}

    def _on_message(self, msg: DeliveredMessage) -> None:
        batch = self.batch
        if not batch.messages:
            batch.opened = time.monotonic()
            # the clock of a batch: far finer than the skew allowance, and read once, not per event
            self.context = {"now": datetime.now(UTC), "clock_skew": self.skew}
        parsed = parse(msg.body, limit=self.settings.max_message_bytes, context=self.context)
        batch.messages.append(msg)
        if isinstance(parsed, Rejected):
            batch.rejected.append((msg, parsed))
        else:
            batch.events.append((msg, parsed))
        self.last_delivery = time.monotonic()
        if len(batch) == 1:
            self.arrived.set()
        if len(batch) >= self.settings.batch_size:
            self.full.set()

    async def _consume(self, msg: DeliveredMessage) -> None:
        self._on_message(msg)

    async def _subscribe(self, channel: AbstractRobustChannel) -> aiormq.abc.AbstractChannel:
        """Register the consumer on the channel's current aiormq channel."""
        underlay = await channel.get_underlay_channel()
        await underlay.basic_consume(self.names.events_queue, self._consume, consumer_tag=self.tag)
        return underlay

    async def run(self, stop: asyncio.Event) -> None:
        channel = await self.connection.channel(publisher_confirms=True)
        await declare_topology(channel, self.settings)
        await channel.set_qos(prefetch_count=self.settings.prefetch)
        dlx = await channel.get_exchange(self.names.dead_letter_exchange)

        async def resubscribe(_: Any) -> None:
            await self._subscribe(channel)
            log.warning("consuming again after a reconnect", extra={"action": "ingest.resubscribe"})

        await self._subscribe(channel)
        channel.reopen_callbacks.add(resubscribe)
        self.health.set("consuming", True)
        log.info("ingest consuming", extra={"action": "ingest.start", "queue": self.names.events_queue})
        try:
            await self._loop(stop, dlx)
        finally:
            self.health.set("consuming", False)
            channel.reopen_callbacks.discard(resubscribe)
            if not channel.is_closed:
                await (await channel.get_underlay_channel()).basic_cancel(self.tag)
                # deliveries that raced the cancel are in the batch: finish them
                if len(self.batch):
                    await self._flush(dlx, stop=None)
                await channel.close()
            log.info("ingest stopped", extra={"action": "ingest.stop"})

    async def _loop(self, stop: asyncio.Event, dlx: AbstractExchange) -> None:
        interval = self.settings.flush_interval
        while not stop.is_set():
            self.health.beat("ingest")
            if not len(self.batch):
                if self.burst and await self._drained():
                    return
                self.arrived.clear()
                await _wait_any(stop, self.arrived, timeout=interval)
                continue
            remaining = self.batch.opened + interval - time.monotonic()
            if len(self.batch) < self.settings.batch_size and remaining > 0:
                self.full.clear()
                await _wait_any(stop, self.full, timeout=remaining)
                continue
            await self._flush(dlx, stop=stop)

    async def _drained(self) -> bool:
        if time.monotonic() - self.last_delivery < self.settings.flush_interval:
            return False
        ready, _ = await queue_depth(self.connection, self.names.events_queue)
        return ready == 0

    async def _flush(self, dlx: AbstractExchange, stop: asyncio.Event | None) -> None:
        """Write the batch, dead-letter its invalid messages, ack it. Retries while Postgres is down."""
        batch, self.batch = self.batch, Batch()
        started = time.perf_counter()
        rejected = list(batch.rejected)
        if batch.events:
            refused = await self._commit(batch.events, stop)
            if refused is None:
                return  # shutting down with Postgres away: the broker redelivers the batch
            rejected += refused
        if rejected:
            try:
                await publish_all(dlx, (("events", _dead_letter(m, r)) for m, r in rejected))
            except (*UNAVAILABLE, AMQPError) as exc:
                # unacked, the batch comes back after the reconnect; its events are idempotent
                log.error("dead-letter failed", extra={"action": "ingest.dlx_failed", "error": str(exc)})
                return
            for _, why in rejected:
                metrics.EVENTS_REJECTED.labels(why.reason).inc()
                log.warning(
                    "event rejected",
                    extra={"action": "ingest.reject", "reason": why.reason, "detail": why.detail},
                )
        await _ack(batch.messages)
        metrics.BATCH_SIZE.observe(len(batch))
        metrics.BATCH_SECONDS.observe(time.perf_counter() - started)

    async def _commit(
        self, items: list[tuple[DeliveredMessage, Event]], stop: asyncio.Event | None
    ) -> list[tuple[DeliveredMessage, Rejected]] | None:
        """Apply events in one transaction; return those Postgres refused, or None to give up.

        Postgres refusing a batch for its data (not for being down) is found
        out by halving the batch until the culprit stands alone: it is
        dead-lettered, every other event is applied, and nothing loops.
        """
        try:
            await self._apply([event for _, event in items], stop)
        except StoreRejected as exc:
            if len(items) == 1:
                return [(items[0][0], Rejected("rejected_by_database", str(exc)[:500]))]
            half = len(items) // 2
            first = await self._commit(items[:half], stop)
            second = await self._commit(items[half:], stop) if first is not None else None
            return None if first is None or second is None else first + second
        except _Stopping:
            return None
        return []

    async def _apply(self, events: list[Event], stop: asyncio.Event | None) -> None:
        """Commit ``events``, waiting out a database outage (raises _Stopping if told to stop meanwhile)."""
        deltas = coalesce(events)
        delay = 0.2
        while True:
            try:
                outcome = await self.store.apply_batch(
                    deltas, lambda row, delta: apply(row, delta, self.default_timeout)
                )
                break
            except StoreUnavailable as exc:
                metrics.STORE_ERRORS.labels("ingest").inc()
                self.health.set("database", False)
                self.health.beat("ingest")  # waiting on purpose is alive
                log.error(
                    "database unavailable, batch held",
                    extra={"action": "ingest.store_down", "error": str(exc), "retry_in": delay},
                )
                if stop is None or await _wait_any(stop, timeout=delay):
                    raise _Stopping from exc
                delay = min(delay * 2, 10.0)
        self.health.set("database", True)
        now = datetime.now(UTC)
        counts: dict[str, int] = defaultdict(int)
        for event in events:
            counts[event.type] += 1
            metrics.INGEST_LAG.observe((now - event.occurred_at).total_seconds())
        for event_type, n in counts.items():
            metrics.EVENTS_INGESTED.labels(event_type).inc(n)
        for t in outcome.transitions:
            metrics.TRANSITIONS.labels("ingest", t.to_state.value, t.reason).inc()
        if outcome.stale_events:
            metrics.EVENTS_STALE.inc(outcome.stale_events)


class _Stopping(Exception):
    """The process is stopping while Postgres is away: leave the batch to the broker."""


def _dead_letter(msg: DeliveredMessage, rejected: Rejected) -> aio_pika.Message:
    properties = msg.header.properties
    headers = {key: _portable(value) for key, value in (properties.headers or {}).items()}
    headers[REASON_HEADER] = rejected.reason
    headers[DETAIL_HEADER] = rejected.detail
    headers[ROUTING_KEY_HEADER] = msg.routing_key or ""
    return message(msg.body, message_id=properties.message_id, headers=headers)


def _portable(value: Any) -> Any:
    """A header value that can be published again: bytes that are not UTF-8 become text."""
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "backslashreplace")
    if isinstance(value, dict):
        return {str(k): _portable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_portable(v) for v in value]
    return value


async def _ack(messages: list[DeliveredMessage]) -> None:
    """One multiple-ack per channel, of its highest delivery tag.

    After a reconnect a batch may hold deliveries of the old channel; those
    cannot be acked (the broker redelivers them) and must not block the others.
    """
    highest: dict[int, tuple[aiormq.abc.AbstractChannel, int]] = {}
    for msg in messages:
        tag = msg.delivery_tag or 0
        if tag > highest.get(id(msg.channel), (msg.channel, 0))[1]:
            highest[id(msg.channel)] = (msg.channel, tag)
    for channel, tag in highest.values():
        try:
            await channel.basic_ack(tag, multiple=True)
        except (*UNAVAILABLE, AMQPError, aiormq.exceptions.AMQPError) as exc:
            log.warning("ack lost with its channel", extra={"action": "ingest.ack_lost", "error": str(exc)})


async def _wait_any(*events: asyncio.Event, timeout: float) -> bool:
    """Wait until one of ``events`` is set or ``timeout`` passes; True if one is set."""
    if any(e.is_set() for e in events):
        return True
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        done, _ = await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        return bool(done)
    finally:
        for w in waiters:
            w.cancel()

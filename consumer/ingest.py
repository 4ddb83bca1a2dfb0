"""The ingest role: sandbox events from RabbitMQ into the session table.

Messages are parsed at the edge (size, JSON, contract, against a clock read
at most a second earlier) as they arrive, then collected into a batch closed
by size or by time. A batch is one Postgres transaction (events coalesced per
sandbox, the state machine applied); then exactly its deliveries are settled:
the committed events acked, the invalid ones dead-lettered with their reason.
While Postgres is unavailable, the batch is held and retried; dead letters the
broker refuses are held and retried while later batches go on. On a stop
meanwhile, what is held is left to the broker, which delivers it again.
The rules are idempotent, so redelivery is harmless.

Each replica beats into ``ingest_replicas`` and sends itself probes through
the events queue. A probe committed with a batch proves that every event
published before the probe was sent has been committed or dead-lettered: that
is the watermark the scheduler claims against.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from pydantic import ValidationError

from consumer import metrics
from consumer.broker import PROBE_ROUTING_KEY, Broker, Consumer, DeadLetter, Delivery, Outgoing, Publisher
from consumer.errors import BrokerUnavailable, StoreRejected, StoreUnavailable
from consumer.health import Health
from consumer.retrying import Stopping, retrying, sleep_or_stop
from consumer.settings import Settings
from consumer.state import Event, apply, coalesce
from consumer.store import Store
from schemas import EVENT_ADAPTER

log = logging.getLogger(__name__)

# Producers we keep a clock-skew series for; later ones share the label "other".
MAX_PRODUCERS = 100


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


def parse_probe(body: bytes) -> datetime | Rejected:
    """A watermark probe: the time its sender read from the database before sending it."""
    try:
        sent = datetime.fromisoformat(orjson.loads(body)["sent_at"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return Rejected("invalid_probe", "a probe carries {'sent_at': RFC 3339 time}")
    return sent if sent.tzinfo else Rejected("invalid_probe", "sent_at needs an offset")


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


def producer_skews(events: list[tuple[Delivery, Event]], arrived: datetime) -> dict[str, float]:
    """Per producer, seconds between ``arrived`` and its newest stamp in the batch. Pure.

    Transit only adds to it, so the newest stamp gives the best view of how far
    the producer's clock is behind (positive) or ahead (negative).
    """
    newest: dict[str, datetime] = {}
    for delivery, event in events:
        producer = delivery.producer
        if producer not in newest or event.occurred_at > newest[producer]:
            newest[producer] = event.occurred_at
    return {producer: (arrived - at).total_seconds() for producer, at in newest.items()}


@dataclass
class Batch:
    deliveries: int = 0
    events: list[tuple[Delivery, Event]] = field(default_factory=list)
    rejected: list[DeadLetter] = field(default_factory=list)
    probes: list[tuple[Delivery, datetime]] = field(default_factory=list)
    opened: float = 0.0

    def __len__(self) -> int:
        return self.deliveries


class Ingest:
    """One ingest consumer: ``run()`` until ``stop`` is set (or, in burst mode, the queue is empty)."""

    def __init__(
        self, settings: Settings, store: Store, broker: Broker, health: Health, *, burst: bool = False
    ) -> None:
        self.settings = settings
        self.store = store
        self.broker = broker
        self.health = health
        self.burst = burst
        self.replica = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"
        self.batch = Batch()
        self.arrived = asyncio.Event()  # the batch got its first message
        self.full = asyncio.Event()  # the batch reached batch_size
        self.last_delivery = time.monotonic()
        self.default_timeout = timedelta(seconds=settings.default_idle_timeout)
        self.skew = timedelta(seconds=settings.clock_skew)
        # the validation clock: read again once it is this old, a small part of the skew allowed
        self.clock_age = min(1.0, settings.clock_skew / 10)
        self.clock_read = float("-inf")
        self.context: dict[str, Any] = {}
        self.abandoned = False  # deliveries were left to the broker on a stop
        self.producers: dict[str, float] = {}  # producer -> when its skew was last warned about
        self.consumer: Consumer | None = None
        self.held_dead: list[DeadLetter] = []  # refused by the dead-letter queue, tried again
        self.dead_delay = 0.1
        self.dead_retry_at = 0.0

    def _on_delivery(self, delivery: Delivery) -> None:
        now = time.monotonic()
        if now - self.clock_read > self.clock_age:
            self.context = {"now": datetime.now(UTC), "clock_skew": self.skew}
            self.clock_read = now
        batch = self.batch
        if not batch.deliveries:
            batch.opened = now
        batch.deliveries += 1
        if delivery.routing_key == PROBE_ROUTING_KEY:
            probe = parse_probe(delivery.body)
            if isinstance(probe, Rejected):
                batch.rejected.append(DeadLetter(delivery, probe.reason, probe.detail))
            else:
                batch.probes.append((delivery, probe))
        else:
            parsed = parse(delivery.body, limit=self.settings.max_message_bytes, context=self.context)
            if isinstance(parsed, Rejected):
                batch.rejected.append(DeadLetter(delivery, parsed.reason, parsed.detail))
            else:
                batch.events.append((delivery, parsed))
        self.last_delivery = now
        if batch.deliveries == 1:
            self.arrived.set()
        if batch.deliveries >= self.settings.batch_size:
            self.full.set()

    async def run(self, stop: asyncio.Event) -> None:
        self.consumer = await self.broker.consumer(
            self.broker.names.events_queue,
            prefetch=self.settings.prefetch,
            on_delivery=self._on_delivery,
            role="ingest",
        )
        prober = (
            None
            if self.burst
            else await self.broker.publisher(self.broker.names.events_exchange, confirm=True)
        )
        beats = None
        if prober is not None:
            beats = asyncio.create_task(self._beat_forever(prober, stop), name="ingest-heartbeat")
        self.health.set("consuming", True)
        log.info(
            "ingest consuming",
            extra={
                "action": "ingest.start",
                "queue": self.broker.names.events_queue,
                "replica": self.replica,
            },
        )
        try:
            await self._loop(stop)
        finally:
            self.health.set("consuming", False)
            await self.consumer.cancel()
            if beats is not None:
                beats.cancel()
                await asyncio.gather(beats, return_exceptions=True)
            if len(self.batch):
                # deliveries that raced the cancel: one try, nothing is waited out now
                await self._flush(_stopped())
            held = self.consumer.unsettled
            await self.consumer.close()
            if prober is not None:
                await prober.close()
                await self._leave(held)
            log.info("ingest stopped", extra={"action": "ingest.stop", "left_to_broker": held})

    async def _leave(self, held: int) -> None:
        """Remove our heartbeat row, unless we left deliveries to the broker.

        Deliveries left behind go back to the queue; until the broker hands them
        out again, our row's old watermark must keep holding the scheduler back
        (the row retires itself after ``ingest_retire_after``).
        """
        if held or self.abandoned or self.held_dead:
            return
        try:
            await self.store.forget_ingest(self.replica)
        except StoreUnavailable as exc:
            log.warning("heartbeat row left behind", extra={"action": "ingest.leave", "error": str(exc)})

    async def _loop(self, stop: asyncio.Event) -> None:
        interval = self.settings.flush_interval
        while not stop.is_set():
            self.health.beat("ingest")
            if self.held_dead and time.monotonic() >= self.dead_retry_at:
                await self._dead_letter([])
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
            await self._flush(stop)

    async def _drained(self) -> bool:
        if time.monotonic() - self.last_delivery < self.settings.flush_interval:
            return False
        state = await self.broker.queue_state(self.broker.names.events_queue)
        return state.ready == 0

    async def _flush(self, stop: asyncio.Event) -> None:
        """Commit the batch, settle exactly its deliveries; hold it while a service is away."""
        assert self.consumer is not None
        batch, self.batch = self.batch, Batch()
        started = time.perf_counter()
        # probes that came on an earlier channel go back to the queue: someone commits them again
        probes = [sent for d, sent in batch.probes if self.consumer.holds(d)]
        try:
            refused = await self._commit(batch.events, stop) if batch.events else []
            refused_ids = {id(r.delivery) for r in refused}
            await self.consumer.settle(
                [d for d, _ in batch.events if id(d) not in refused_ids] + [d for d, _ in batch.probes]
            )
            await self._dead_letter(batch.rejected + refused)
            if probes:
                watermark = max(probes)
                await self._retry(
                    "watermark", lambda: self.store.advance_watermark(self.replica, watermark), stop
                )
        except Stopping:
            self.abandoned = True
            log.warning(
                "stopping with a batch unsettled: left to the broker",
                extra={"action": "ingest.abandon", "deliveries": len(batch)},
            )
            return
        metrics.BATCH_SIZE.observe(len(batch))
        metrics.BATCH_SECONDS.observe(time.perf_counter() - started)
        log.debug(
            "batch settled",
            extra={
                "action": "ingest.flush",
                "events": len(batch.events),
                "rejected": len(batch.rejected),
                "probes": len(batch.probes),
            },
        )

    async def _retry(self, what: str, attempt: Any, stop: asyncio.Event) -> Any:
        def alive() -> None:
            self.health.beat("ingest")  # waiting on purpose is alive
            self.health.set("database", False)

        return await retrying(what, attempt, stop, role="ingest", on_outage=alive)

    async def _commit(self, items: list[tuple[Delivery, Event]], stop: asyncio.Event) -> list[DeadLetter]:
        """Apply events in one transaction; return the dead letters of those Postgres refused.

        Postgres refusing a batch for its data (not for being down) is found
        out by halving the batch until the culprit stands alone: it is
        dead-lettered, every other event is applied, and nothing loops.
        """
        try:
            await self._apply(items, stop)
        except StoreRejected as exc:
            if len(items) == 1:
                return [DeadLetter(items[0][0], "rejected_by_database", str(exc)[:500])]
            half = len(items) // 2
            return await self._commit(items[:half], stop) + await self._commit(items[half:], stop)
        return []

    async def _apply(self, items: list[tuple[Delivery, Event]], stop: asyncio.Event) -> None:
        """Commit the events of ``items``, waiting out a database outage."""
        events = [event for _, event in items]
        deltas = coalesce(events)
        arrived = datetime.now(UTC)
        default_timeout = self.default_timeout
        outcome = await self._retry(
            "batch held",
            lambda: self.store.apply_batch(deltas, lambda row, d: apply(row, d, default_timeout, arrived)),
            stop,
        )
        self.health.set("database", True)
        self._count(items, arrived)
        moves = Counter((t.to_state.value, t.reason) for t in outcome.transitions)
        for (to_state, reason), n in moves.items():
            metrics.TRANSITIONS.labels("ingest", to_state, reason).inc(n)
        if outcome.stale_events:
            metrics.EVENTS_STALE.inc(outcome.stale_events)

    def _count(self, items: list[tuple[Delivery, Event]], arrived: datetime) -> None:
        """Metrics per batch, not per event: counts by type, and the lag of the batch's oldest event."""
        counts: dict[str, int] = defaultdict(int)
        oldest = arrived
        for _, event in items:
            counts[event.type] += 1
            if event.occurred_at < oldest:
                oldest = event.occurred_at
        metrics.INGEST_LAG.observe((arrived - oldest).total_seconds())
        for event_type, n in counts.items():
            metrics.EVENTS_INGESTED.labels(event_type).inc(n)
        for producer, skew in producer_skews(items, arrived).items():
            self._track_skew(producer, skew)

    def _track_skew(self, producer: str, skew: float) -> None:
        if producer not in self.producers and len(self.producers) >= MAX_PRODUCERS:
            producer = "other"
        metrics.PRODUCER_SKEW.labels(producer).set(skew)
        now = time.monotonic()
        if abs(skew) > self.settings.producer_skew_warning and now - self.producers.get(producer, -1e9) > 60:
            self.producers[producer] = now
            log.warning(
                "a producer's clock is off: its events arrive far from their stamps",
                extra={"action": "ingest.producer_clock", "producer": producer, "skew_s": round(skew, 1)},
            )
        else:
            self.producers.setdefault(producer, -1e9)

    async def _dead_letter(self, items: list[DeadLetter]) -> None:
        """Dead-letter ``items`` and those held before, with confirms; hold what the broker refuses.

        Held dead letters stay unsettled (in hand, not acked) and are tried
        again with a backoff while ingest goes on with later batches: one
        message the dead-letter queue cannot take yet never stops the others.
        """
        assert self.consumer is not None
        consumer = self.consumer
        # a delivery of a closed channel is the broker's again: it comes back and is judged again
        pending = [d for d in (*self.held_dead, *items) if consumer.holds(d.delivery)]
        if not pending:
            self.held_dead = []
            return
        try:
            refused = await consumer.dead_letter(pending)
        except BrokerUnavailable as exc:
            log.error("dead letters held", extra={"action": "ingest.outage", "error": str(exc)})
            refused = [d for d in pending if consumer.holds(d.delivery)]
        refused_ids = {id(d) for d in refused}
        for item in pending:
            if id(item) not in refused_ids:
                metrics.EVENTS_REJECTED.labels(item.reason).inc()
                log.warning(
                    "event rejected",
                    extra={"action": "ingest.reject", "reason": item.reason, "detail": item.detail},
                )
        self.held_dead = refused
        if refused:
            self.dead_delay = min(self.dead_delay * 2, 10.0)
            self.dead_retry_at = time.monotonic() + self.dead_delay
            log.error(
                "dead letters refused by the broker, held",
                extra={"action": "ingest.dlx_held", "messages": len(refused), "retry_in": self.dead_delay},
            )
        else:
            self.dead_delay = 0.1

    async def _beat_forever(self, prober: Publisher, stop: asyncio.Event) -> None:
        """Beat and probe every ``ingest_beat_interval``. Failure policy: log, try again next beat."""
        assert self.consumer is not None
        while not stop.is_set():
            metrics.INGEST_UNSETTLED.set(self.consumer.unsettled)
            try:
                now = await self.store.beat_ingest(
                    self.replica, self.consumer.unsettled, self.consumer.unsettled_redelivered
                )
                body = orjson.dumps({"sent_at": now.isoformat(), "replica": self.replica})
                await prober.publish([Outgoing(PROBE_ROUTING_KEY, body)])
            except (StoreUnavailable, BrokerUnavailable) as exc:
                log.debug("heartbeat skipped", extra={"action": "ingest.beat_failed", "error": str(exc)})
            except Exception as exc:  # a lost heartbeat only makes the scheduler wait: never stop beating
                log.error("heartbeat failed", exc_info=exc, extra={"action": "ingest.beat_failed"})
            if await sleep_or_stop(stop, self.settings.ingest_beat_interval):
                return


def _stopped() -> asyncio.Event:
    stopped = asyncio.Event()
    stopped.set()
    return stopped


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

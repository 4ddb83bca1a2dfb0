"""Publishing sandbox events from an app service: the producer side of autopause, for Python apps.

::

    async with Reporter(amqp_url, app_id="builder-api") as reporter:
        await reporter.created(sandbox_id, project_id="p-42", user_id="u-7", template="base")
        reporter.activity(sandbox_id, "terminal")   # as often as you like: debounced
        await reporter.killed(sandbox_id)

Every event is built with the contracts of :mod:`schemas.events`, so what
leaves here passes ingest's validation. Messages are persistent JSON, published
to ``sandbox.events`` with the event type as routing key, ``message_id`` =
``event_id`` and ``app_id`` = the app's name (ingest tracks each producer's clock
by it). The connection is robust (it reconnects by itself) and every message is
confirmed by the broker: ``created`` and ``killed`` return once RabbitMQ has
taken the event; a publish that fails (connection lost, negative confirm, for
example from a full queue) is tried again until it is confirmed or the reporter
is closed, when what is still unconfirmed is reported by :class:`Undelivered`.

Activity is debounced per sandbox: the first activity after a quiet interval
goes out at once (a paused sandbox is then seen to resume promptly); more
activity within ``activity_interval`` is folded into one event carrying the
latest time, sent when the interval is over, and on :meth:`Reporter.close`.
A chatty terminal then costs a few events a minute.

Events wait in a bounded buffer (pending activity plus unconfirmed events);
when it is full, :class:`BufferFull` is raised at once instead of letting
memory grow while the broker is away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import aio_pika
from aio_pika.abc import AbstractExchange, AbstractRobustConnection, DeliveryMode
from pamqp.commands import Basic

from consumer.errors import AutopauseError
from schemas.events import ActivitySource, SandboxActivity, SandboxCreated, SandboxKilled

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16_384  # ingest's AUTOPAUSE_MAX_MESSAGE_BYTES default
Event = SandboxCreated | SandboxActivity | SandboxKilled


class ReporterError(AutopauseError):
    """The reporter could not take or deliver an event."""


class BufferFull(ReporterError):
    """Too many events wait for the broker: the event was not taken. Try later, or drop it."""


class Undelivered(ReporterError):
    """Events still unconfirmed when the reporter closed; ``events`` lists them."""

    def __init__(self, events: list[Event]) -> None:
        super().__init__(f"{len(events)} events were not confirmed by RabbitMQ before the reporter closed")
        self.events = events


@dataclass
class _Outgoing:
    event: Event
    body: bytes
    done: asyncio.Future[None] | None = None
    attempts: int = 0


@dataclass
class _Activity:
    occurred_at: datetime
    source: ActivitySource


@dataclass
class _Stats:
    confirmed: int = 0
    retried: int = 0
    debounced: int = 0
    by_type: dict[str, int] = field(default_factory=dict)


class Reporter:
    """Publishes sandbox.created / sandbox.activity / sandbox.killed for one app service."""

    def __init__(
        self,
        amqp_url: str,
        *,
        app_id: str,
        exchange: str = "sandbox.events",
        activity_interval: float = 10.0,
        max_buffer: int = 10_000,
        window: int = 128,
        publish_timeout: float = 10.0,
        retry_delay: float = 0.5,
        close_timeout: float = 30.0,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        if activity_interval <= 0 or max_buffer < 1 or window < 1:
            raise ValueError("activity_interval must be positive, max_buffer and window at least 1")
        self.amqp_url = amqp_url
        self.app_id = app_id
        self.exchange_name = exchange
        self.activity_interval = activity_interval
        self.max_buffer = max_buffer
        self.window = window
        self.publish_timeout = publish_timeout
        self.retry_delay = retry_delay
        self.close_timeout = close_timeout
        self.clock = clock or (lambda: datetime.now(UTC))
        self.stats = _Stats()
        self._connection: AbstractRobustConnection | None = None
        self._exchange: AbstractExchange | None = None
        self._outbox: deque[_Outgoing] = deque()
        self._in_flight = 0
        self._pending: dict[str, _Activity] = {}
        self._last_sent: dict[str, float] = {}
        self._wake_publisher = asyncio.Event()
        self._wake_debouncer = asyncio.Event()
        self._idle = asyncio.Event()
        self._closing = False
        self._tasks: list[asyncio.Task[None]] = []

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> Reporter:
        await self.start()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Connect (robustly) and open a channel with publisher confirms."""
        self._connection = await aio_pika.connect_robust(
            self.amqp_url, client_properties={"connection_name": f"{self.app_id} reporter"}
        )
        channel = await self._connection.channel(publisher_confirms=True)
        # no declare: an app's user may only publish to the exchange, which the broker defines
        self._exchange = await channel.get_exchange(self.exchange_name, ensure=False)
        self._tasks = [
            asyncio.create_task(self._publish_forever(), name="reporter-publish"),
            asyncio.create_task(self._debounce_forever(), name="reporter-debounce"),
        ]

    async def close(self) -> None:
        """Send pending activity, wait for every confirm (up to ``close_timeout``), disconnect.

        Raises :class:`Undelivered` with the events that RabbitMQ did not confirm in time.
        """
        if self._closing:
            return
        self._closing = True
        undelivered: list[Event] = []
        try:
            self._move_due(force=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained(), timeout=self.close_timeout)
            undelivered = [item.event for item in self._outbox]
            for item in self._outbox:
                if item.done is not None and not item.done.done():
                    item.done.set_exception(Undelivered([item.event]))
            self._outbox.clear()
        finally:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            if self._connection is not None:
                await self._connection.close()
        if undelivered:
            raise Undelivered(undelivered)

    # -- the events ------------------------------------------------------------------------

    async def created(
        self,
        sandbox_id: str,
        *,
        project_id: str,
        user_id: str,
        template: str,
        idle_timeout_s: int | None = None,
        metadata: dict[str, str] | None = None,
    ) -> uuid.UUID:
        """Publish sandbox.created and wait until RabbitMQ has confirmed it; return its event_id."""
        event = SandboxCreated(
            event_id=uuid.uuid4(),
            occurred_at=self.clock(),
            sandbox_id=sandbox_id,
            project_id=project_id,
            user_id=user_id,
            template=template,
            idle_timeout_s=idle_timeout_s,
            metadata=metadata or {},
        )
        await self._send(event)
        return event.event_id

    def activity(self, sandbox_id: str, source: ActivitySource = "other") -> None:
        """Note that the sandbox is in use now; sent at once or folded into the next event (no wait).

        Raises BufferFull when the buffer is full and this sandbox has no activity pending yet.
        """
        self._check_open()
        occurred_at = self.clock()
        # validate now, so that a bad id fails here and not in the background
        SandboxActivity(event_id=uuid.uuid4(), occurred_at=occurred_at, sandbox_id=sandbox_id, source=source)
        pending = self._pending.get(sandbox_id)
        if pending is not None:
            self.stats.debounced += 1
            if occurred_at >= pending.occurred_at:
                pending.occurred_at, pending.source = occurred_at, source
            return
        if self.buffered >= self.max_buffer:
            raise BufferFull(f"{self.buffered} events wait for RabbitMQ (max_buffer={self.max_buffer})")
        self._pending[sandbox_id] = _Activity(occurred_at, source)
        self._wake_debouncer.set()

    async def killed(self, sandbox_id: str, reason: str | None = None) -> uuid.UUID:
        """Publish sandbox.killed (after any pending activity of the sandbox), wait for its confirm."""
        pending = self._pending.pop(sandbox_id, None)
        if pending is not None:
            self._enqueue(self._activity_event(sandbox_id, pending))
        event = SandboxKilled(
            event_id=uuid.uuid4(), occurred_at=self.clock(), sandbox_id=sandbox_id, reason=reason
        )
        await self._send(event)
        return event.event_id

    async def flush(self) -> None:
        """Send every pending activity now and wait until everything is confirmed."""
        self._check_open()
        self._move_due(force=True)
        await self._drained()

    @property
    def buffered(self) -> int:
        """Events taken but not confirmed yet: pending activity, queued and in flight."""
        return len(self._pending) + len(self._outbox) + self._in_flight

    # -- internals -------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closing or self._exchange is None:
            raise ReporterError("the reporter is not started, or closed")

    def _activity_event(self, sandbox_id: str, pending: _Activity) -> SandboxActivity:
        return SandboxActivity(
            event_id=uuid.uuid4(),
            occurred_at=pending.occurred_at,
            sandbox_id=sandbox_id,
            source=pending.source,
        )

    def _enqueue(self, event: Event, done: asyncio.Future[None] | None = None) -> _Outgoing:
        body = event.model_dump_json(exclude_none=True).encode()
        if len(body) > MAX_BODY_BYTES:
            raise ReporterError(
                f"{event.type} is {len(body)} bytes; autopause takes at most {MAX_BODY_BYTES}"
            )
        item = _Outgoing(event, body, done)
        self._outbox.append(item)
        self._idle.clear()
        self._wake_publisher.set()
        return item

    async def _send(self, event: Event) -> None:
        self._check_open()
        if self.buffered >= self.max_buffer:
            raise BufferFull(f"{self.buffered} events wait for RabbitMQ (max_buffer={self.max_buffer})")
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._enqueue(event, done)
        await done

    def _move_due(self, *, force: bool = False) -> float | None:
        """Move pending activity whose interval is over into the outbox; return seconds to the next."""
        now = time.monotonic()
        soonest: float | None = None
        for sandbox_id in list(self._pending):
            due = self._last_sent.get(sandbox_id, -float("inf")) + self.activity_interval
            if force or due <= now:
                self._enqueue(self._activity_event(sandbox_id, self._pending.pop(sandbox_id)))
                self._last_sent[sandbox_id] = now
            else:
                soonest = due - now if soonest is None else min(soonest, due - now)
        # forget sandboxes quiet for a whole interval: their next activity goes out at once
        stale = now - self.activity_interval
        for sandbox_id in [s for s, at in self._last_sent.items() if at < stale and s not in self._pending]:
            del self._last_sent[sandbox_id]
        return soonest

    async def _debounce_forever(self) -> None:
        while True:
            self._wake_debouncer.clear()
            wait = self._move_due()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake_debouncer.wait(), timeout=wait)

    async def _drained(self) -> None:
        """Until the outbox is empty and nothing is in flight (move pending activity first)."""
        while self._outbox or self._in_flight:
            self._idle.clear()
            self._wake_publisher.set()
            await self._idle.wait()

    async def _publish_forever(self) -> None:
        while True:
            if not self._outbox:
                self._idle.set()
                self._wake_publisher.clear()
                await self._wake_publisher.wait()
                continue
            batch = [self._outbox.popleft() for _ in range(min(self.window, len(self._outbox)))]
            self._in_flight += len(batch)
            try:
                results = await asyncio.gather(
                    *(self._publish(item) for item in batch), return_exceptions=True
                )
            finally:
                self._in_flight -= len(batch)
            failed = [item for item, ok in zip(batch, results, strict=True) if ok is not True]
            for item, ok in zip(batch, results, strict=True):
                if ok is True and item.done is not None and not item.done.done():
                    item.done.set_result(None)
            if failed:
                # back to the front, in order; the same event_id makes a duplicate harmless
                self.stats.retried += len(failed)
                self._outbox.extendleft(reversed(failed))
                await asyncio.sleep(self.retry_delay)

    async def _publish(self, item: _Outgoing) -> bool | BaseException:
        assert self._exchange is not None
        item.attempts += 1
        message = aio_pika.Message(
            item.body,
            content_type="application/json",
            delivery_mode=DeliveryMode.PERSISTENT,
            message_id=str(item.event.event_id),
            app_id=self.app_id,
            type=item.event.type,
            timestamp=item.event.occurred_at,
        )
        try:
            confirm: Any = await self._exchange.publish(
                message, routing_key=item.event.type, timeout=self.publish_timeout
            )
        except Exception as exc:  # not confirmed, whatever the cause: tried again, never lost here
            if item.attempts == 1 or item.attempts % 10 == 0:
                log.warning(
                    "event not confirmed, will retry",
                    extra={"action": "reporter.retry", "type": item.event.type, "error": repr(exc)},
                )
            return exc
        if not isinstance(confirm, Basic.Ack):
            return ReporterError(f"RabbitMQ did not confirm: {confirm!r}")
        self.stats.confirmed += 1
        self.stats.by_type[item.event.type] = self.stats.by_type.get(item.event.type, 0) + 1
        return True

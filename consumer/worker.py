"""The worker role: carries out pause commands through the E2B adapter, concurrently.

Per command: a compare-and-set check (the row must be PAUSING with the
command's generation, else the command is acked and dropped with no E2B call),
a rate-limiter token, the call, and the outcome written conditionally. Retryable
failures back off with jitter, a bounded number of times; then the row goes back
to RUNNING with ``last_error`` and a ``retry_after`` that the scheduler honours.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import TypeVar

from aio_pika.abc import AbstractExchange, AbstractIncomingMessage, AbstractRobustConnection
from aio_pika.exceptions import AMQPError
from pydantic import ValidationError

from consumer import metrics
from consumer.broker import UNAVAILABLE, Names, connection_name, message, queue_depth
from consumer.e2b_adapter import E2BClient, PauseOutcome, PauseResult
from consumer.errors import StoreUnavailable
from consumer.health import Health
from consumer.ratelimit import TokenBucket
from consumer.settings import PauseMode, Settings
from consumer.state import State
from consumer.store import Claim, Store
from consumer.timing import backoff_delay
from schemas import COMMAND_ADAPTER, Outcome, PauseCommand

log = logging.getLogger(__name__)
T = TypeVar("T")

# A dry-run claim parks the row until newer activity moves its deadline.
PARKED = datetime(9999, 1, 1, tzinfo=UTC)
EMULATOR_KEY = "e2b_emulator"


@dataclass(frozen=True)
class Decision:
    """What to do after one pause attempt."""

    to_state: State | None  # None: retry
    reason: str
    outcome_type: str | None = None


def decide(result: PauseResult, attempt: int, max_attempts: int) -> Decision:
    """Pure: the next step for a pause result on ``attempt`` (1-based)."""
    match result.outcome:
        case PauseOutcome.PAUSED:
            return Decision(State.PAUSED, "paused", "sandbox.paused")
        case PauseOutcome.ALREADY_PAUSED:
            return Decision(State.PAUSED, "already_paused", "sandbox.paused")
        case PauseOutcome.GONE:
            return Decision(State.KILLED, "gone", "sandbox.gone")
        case PauseOutcome.RETRYABLE if attempt < max_attempts:
            return Decision(None, "retry")
        case _:
            return Decision(State.RUNNING, "pause_failed", "sandbox.pause_failed")


class Worker:
    """One worker process: ``settings.worker_concurrency`` pauses in flight at most."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        connection: AbstractRobustConnection,
        health: Health,
        e2b_url: str | None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.connection = connection
        self.health = health
        self.names = Names(settings.topology_prefix)
        self.client = E2BClient(
            api_key=settings.e2b_key or EMULATOR_KEY,
            api_url=e2b_url,
            request_timeout=settings.e2b_request_timeout,
            memory=settings.pause_mode is PauseMode.FULL,
        )
        rate = settings.worker_rate
        self.bucket = TokenBucket(rate, capacity=max(1.0, rate / 10))
        self.in_flight: set[asyncio.Task[None]] = set()
        self.last_delivery = time.monotonic()
        self.stop = asyncio.Event()
        self.lifecycle: AbstractExchange | None = None

    async def run(self, stop: asyncio.Event, *, burst: bool = False) -> None:
        self.stop = stop
        # Outcomes are announcements (the row is the truth), published without
        # confirms: with them, publishing took about a sixth of the worker's time.
        channel = await self.connection.channel(publisher_confirms=False)
        await channel.set_qos(prefetch_count=self.settings.worker_concurrency)
        queue = await channel.get_queue(self.names.pause_queue)
        self.lifecycle = await channel.get_exchange(self.names.lifecycle_exchange)
        tag = await queue.consume(
            self._on_message,
            consumer_tag=f"{connection_name('worker').replace(' ', '-')}-{id(self):x}",
        )
        self.health.set("consuming", True)
        log.info("worker consuming", extra={"action": "worker.start", "dry_run": self.settings.dry_run})
        try:
            while not stop.is_set():
                self.health.beat("worker")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=0.5 if burst else 5)
                if burst and await self._drained():
                    break
        finally:
            self.health.set("consuming", False)
            if not channel.is_closed:
                await queue.cancel(tag)
            await self._finish_in_flight()
            if not channel.is_closed:
                await channel.close()
            log.info("worker stopped", extra={"action": "worker.stop"})

    async def _drained(self) -> bool:
        if self.in_flight or time.monotonic() - self.last_delivery < 0.5:
            return False
        ready, _ = await queue_depth(self.connection, self.names.pause_queue)
        return ready == 0

    async def _finish_in_flight(self) -> None:
        """Await in-flight pauses up to the grace period; the rest are redelivered."""
        if not self.in_flight:
            return
        _, late = await asyncio.wait(self.in_flight, timeout=self.settings.shutdown_grace)
        for task in late:
            task.cancel()
        if late:
            await asyncio.wait(late)

    async def _on_message(self, msg: AbstractIncomingMessage) -> None:
        self.last_delivery = time.monotonic()
        task = asyncio.create_task(self._handle(msg), name=f"pause-{msg.delivery_tag}")
        self.in_flight.add(task)
        metrics.IN_FLIGHT.set(len(self.in_flight))
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.in_flight.discard(task)
        metrics.IN_FLIGHT.set(len(self.in_flight))
        if not task.cancelled() and task.exception() is not None:
            log.error("pause handler failed", exc_info=task.exception(), extra={"action": "worker.crash"})

    async def _handle(self, msg: AbstractIncomingMessage) -> None:
        try:
            command = COMMAND_ADAPTER.validate_json(msg.body)
        except ValidationError as exc:
            metrics.COMMANDS_DROPPED.labels("invalid").inc()
            log.warning(
                "invalid pause command",
                extra={"action": "worker.invalid", "error": str(exc.errors()[0]["msg"])},
            )
            await msg.reject(requeue=False)
            return
        try:
            finished = await self._pause(command)
        except (*UNAVAILABLE, AMQPError) as exc:
            log.error(
                "broker lost during a pause",
                extra={"action": "worker.broker_lost", "error": str(exc)},
            )
            return  # unacked: redelivered after the reconnect
        if finished:
            with contextlib.suppress(*UNAVAILABLE, AMQPError):
                await msg.ack()

    async def _store(self, call: Callable[[], Awaitable[T]]) -> T | None:
        """Run a store call, waiting out a database outage; None if the process stops meanwhile."""
        delay = 0.2
        while True:
            try:
                return await call()
            except StoreUnavailable as exc:
                metrics.STORE_ERRORS.labels("worker").inc()
                log.error("database unavailable", extra={"action": "worker.store_down", "error": str(exc)})
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), timeout=delay)
                if self.stop.is_set():
                    return None
                delay = min(delay * 2, 10.0)

    async def _pause(self, command: PauseCommand) -> bool:
        """Carry out one command; True when it is finished (ack it), False to leave it for redelivery."""
        claim = Claim(command.sandbox_id, command.generation)
        settings = self.settings
        for attempt in range(1, settings.pause_max_attempts + 1):
            backed = await self._store(lambda: self.store.command_backed(claim.sandbox_id, claim.generation))
            if backed is None:
                return False
            if not backed:
                metrics.COMMANDS_DROPPED.labels("not_backed" if attempt == 1 else "superseded").inc()
                log.info(
                    "command not backed by its row, dropped",
                    extra={
                        "action": "worker.drop",
                        "sandbox_id": claim.sandbox_id,
                        "generation": claim.generation,
                    },
                )
                return True
            if settings.dry_run:
                return await self._finish(
                    claim, Decision(State.RUNNING, "dry_run", "sandbox.paused"), attempt, None
                )
            waited = await self.bucket.take()
            metrics.RATE_LIMIT_WAIT.observe(waited)
            result = await self.client.pause(claim.sandbox_id)
            metrics.E2B_LATENCY.labels("pause").observe(result.latency)
            metrics.PAUSE_CALLS.labels(result.outcome.value).inc()
            decision = decide(result, attempt, settings.pause_max_attempts)
            if decision.to_state is not None:
                return await self._finish(claim, decision, attempt, result.error)
            if (
                await self._store(
                    partial(self.store.record_attempt, claim, attempt, result.error or "retryable")
                )
                is None
            ):
                return False
            delay = backoff_delay(attempt, settings.retry_base_delay, settings.retry_max_delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), timeout=delay)
            if self.stop.is_set():
                return False
        raise AssertionError("the last attempt always decides")  # pragma: no cover

    async def _finish(self, claim: Claim, decision: Decision, attempts: int, error: str | None) -> bool:
        assert decision.to_state is not None
        retry_after = None
        due_at = None
        if decision.reason == "pause_failed":
            retry_after = datetime.now(UTC) + timedelta(seconds=self.settings.retry_after)
            due_at = retry_after
        elif decision.reason == "dry_run":
            due_at = PARKED
        to_state = decision.to_state

        async def write() -> bool:
            return await self.store.finish_pause(
                claim,
                to_state,
                decision.reason,
                attempts=attempts,
                error=error,
                retry_after=retry_after,
                due_at=due_at,
            )

        moved = await self._store(write)
        if moved is None:
            return False
        metrics.PAUSES.labels(decision.reason if moved else "superseded").inc()
        if moved:
            metrics.TRANSITIONS.labels("worker", to_state.value, decision.reason).inc()
        log.info(
            "pause finished",
            extra={
                "action": "worker.finish",
                "sandbox_id": claim.sandbox_id,
                "result": decision.reason,
                "row_moved": moved,
            },
        )
        if decision.outcome_type is not None:
            await self._announce(claim, decision.outcome_type, error)
        return True

    async def _announce(self, claim: Claim, outcome_type: str, error: str | None) -> None:
        """Tell app services what became of the sandbox (best effort: the row is the truth)."""
        assert self.lifecycle is not None
        outcome = Outcome(
            event_id=uuid.uuid4(),
            type=outcome_type,  # type: ignore[arg-type]
            occurred_at=datetime.now(UTC),
            sandbox_id=claim.sandbox_id,
            generation=claim.generation,
            dry_run=self.settings.dry_run,
            error=error[:500] if error else None,
        )
        try:
            # not mandatory: no app listening is normal, not an error to be returned
            await self.lifecycle.publish(
                message(outcome.model_dump_json().encode()), routing_key=outcome_type, mandatory=False
            )
        except (*UNAVAILABLE, AMQPError) as exc:
            log.warning(
                "outcome not published",
                extra={"action": "worker.announce_failed", "error": str(exc)},
            )

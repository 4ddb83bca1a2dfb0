"""The worker role: carries out pause commands through the E2B adapter, concurrently.

Per command: its row must back it (PAUSING, same generation), else it is
dropped with no E2B call. E2B's latest CPU sample may veto the pause (see
consumer/busy.py); that check waits for company outside the pause slots, so it
never holds one. Then, in one of ``worker_concurrency`` slots, per attempt: a
compare-and-set takes the row (no other attempt may hold it, so a copy of the
command never calls E2B at the same time); E2B is asked for the sandbox's end
of life unless a recent listing gave it; the pause call; the outcome written by
a second compare-and-set. The decisions are pure, in consumer/pausing.py.

What concurrent commands ask of Postgres (the backing reads, the two
compare-and-sets) and the acks of the broker go out in batches, one statement
per short window (consumer/batching.py).

A pause that raced with activity is repaired at once: when the closing
compare-and-set finds the row RUNNING, the worker resumes the sandbox (with
at least the lifetime it had left) and records ``paused_in_use``. Activity that
lands after the pause was written is flagged on the row by ingest; every worker
looks for such rows each ``repair_interval`` and does the same.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

from pydantic import ValidationError

from consumer import metrics
from consumer.batching import Batcher, distinct_rounds
from consumer.broker import Broker, Consumer, DeadLetter, Delivery, Outgoing, Publisher
from consumer.busy import CpuProbe, is_busy
from consumer.e2b_adapter import METRICS_BATCH, CallOutcome, CallResult, E2BClient
from consumer.errors import BrokerUnavailable, StoreUnavailable
from consumer.health import Health
from consumer.pausing import Decision, decide, must_repair, pause_end
from consumer.ratelimit import TokenBucket
from consumer.repairs import Repairer
from consumer.retrying import Stopping, retrying, sleep_or_stop
from consumer.settings import Settings
from consumer.state import Reason
from consumer.store import Attempt, Backing, Claim, PauseEnd, PauseFinished, Store
from consumer.timing import backoff_delay
from schemas import COMMAND_ADAPTER, Outcome, OutcomeType, PauseCommand

log = logging.getLogger(__name__)
T = TypeVar("T")

# How long a database batch waits for company. Each pause waits it twice inside its slot, so
# it is kept to half a millisecond: at 2 ms, c=16 made 0.89 of the SDK alone's rate, at 0.5 ms
# 0.92, with no loss at c=256 (docs/benchmarks.md); more company comes from the round trip of
# the statement in flight, which the next batch waits out anyway.
DB_WINDOW = 0.0005
DB_BATCH = 200


@dataclass(frozen=True)
class Step:
    """After one attempt: the command is finished, or wait (another attempt holds the row), or retry."""

    finished: bool = False
    called: bool = False  # a pause call was made, so E2B may have paused the sandbox
    wait: float | None = None


class Worker:
    """One worker process: ``settings.worker_concurrency`` pauses in flight at most."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        broker: Broker,
        health: Health,
        client: E2BClient,
        bucket: TokenBucket,
    ) -> None:
        self.settings = settings
        self.store = store
        self.broker = broker
        self.health = health
        self.client = client
        self.bucket = bucket
        self.cpu = CpuProbe(client, bucket, saturated=self._saturated)
        self.repairer = Repairer(settings, store, client, bucket)
        self.slots = asyncio.Semaphore(settings.worker_concurrency)
        self.waiting_for_slot = 0  # commands past the CPU check, waiting for a pause slot
        self.backing = Batcher(store.commands_backed, max_size=DB_BATCH, window=DB_WINDOW, name="backing")
        self.begins: Batcher[tuple[Claim, uuid.UUID, int], Attempt] = Batcher(
            self._begin_batch, max_size=DB_BATCH, window=DB_WINDOW, name="begin-attempts"
        )
        self.finishes: Batcher[tuple[Claim, uuid.UUID, PauseEnd], PauseFinished] = Batcher(
            self._finish_batch, max_size=DB_BATCH, window=DB_WINDOW, name="finish-pauses"
        )
        self.acks: Batcher[Delivery, None] = Batcher(
            self._settle_batch, max_size=DB_BATCH, window=DB_WINDOW, name="acks"
        )
        self.in_flight: set[asyncio.Task[None]] = set()
        self.last_delivery = time.monotonic()
        self.stop = asyncio.Event()
        self.consumer: Consumer | None = None
        self.outcomes: Publisher | None = None

    async def run(self, stop: asyncio.Event, *, burst: bool = False) -> None:
        self.stop = stop
        names = self.broker.names
        # Outcomes are announcements (the row is the truth), published without
        # confirms: with them, publishing took about a sixth of the worker's time.
        self.outcomes = await self.broker.publisher(names.lifecycle_exchange, confirm=False)
        # Commands waiting for their CPU sample hold no pause slot: room for a batch filling,
        # one in its request and one waiting for a slot, so the check never starves the slots.
        self.consumer = await self.broker.consumer(
            names.pause_queue,
            prefetch=self.settings.worker_concurrency + 3 * METRICS_BATCH,
            on_delivery=self._on_delivery,
            role="worker",
        )
        repairs = asyncio.create_task(self.repairer.run_forever(stop), name="worker-repairs")
        self.health.set("consuming", True)
        log.info("worker consuming", extra={"action": "worker.start", "dry_run": self.settings.dry_run})
        try:
            while not stop.is_set():
                self.health.beat("worker")
                if await sleep_or_stop(stop, 0.5 if burst else 5):
                    break
                if burst and await self._drained():
                    break
        finally:
            self.health.set("consuming", False)
            await self.consumer.cancel()
            await self._finish_in_flight()
            repairs.cancel()
            await asyncio.gather(repairs, return_exceptions=True)
            await self.consumer.close()
            await self.outcomes.close()
            log.info("worker stopped", extra={"action": "worker.stop"})

    async def _drained(self) -> bool:
        if self.in_flight or time.monotonic() - self.last_delivery < 0.5:
            return False
        try:
            state = await self.broker.queue_state(self.broker.names.pause_queue)
            return state.ready == 0 and await self.store.pending_repairs() == 0
        except (StoreUnavailable, BrokerUnavailable):
            return False

    async def _finish_in_flight(self) -> None:
        """Await in-flight pauses up to the grace period; the rest are redelivered."""
        if not self.in_flight:
            return
        _, late = await asyncio.wait(self.in_flight, timeout=self.settings.shutdown_grace)
        for task in late:
            task.cancel()
        if late:
            await asyncio.wait(late)

    def _on_delivery(self, delivery: Delivery) -> None:
        self.last_delivery = time.monotonic()
        task = asyncio.create_task(self._handle(delivery), name=f"pause-{delivery.tag}")
        self.in_flight.add(task)
        metrics.IN_FLIGHT.set(len(self.in_flight))
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.in_flight.discard(task)
        metrics.IN_FLIGHT.set(len(self.in_flight))

    async def _handle(self, delivery: Delivery) -> None:
        """One command, start to end. Failure policy: an unexpected error dead-letters the command
        with its reason (the row stays PAUSING and its lease sends the command again)."""
        try:
            command = COMMAND_ADAPTER.validate_json(delivery.body)
        except ValidationError as exc:
            metrics.COMMANDS_DROPPED.labels("invalid").inc()
            detail = str(exc.errors()[0]["msg"])[:500]
            log.warning("invalid pause command", extra={"action": "worker.invalid", "error": detail})
            await self._dead_letter(DeadLetter(delivery, "invalid_command", detail))
            return
        try:
            finished = await self._carry_out(command)
        except Stopping:
            return  # unsettled: the broker delivers it again
        except Exception as exc:
            log.error("pause handler failed", exc_info=exc, extra={"action": "worker.crash"})
            detail = f"{type(exc).__name__}: {exc}"[:500]
            await self._dead_letter(DeadLetter(delivery, "worker_error", detail))
            return
        if finished:
            await self.acks.submit(delivery)

    async def _dead_letter(self, item: DeadLetter) -> None:
        assert self.consumer is not None
        try:
            if await self.consumer.dead_letter([item]):
                log.error("dead letter refused; the command is redelivered", extra={"action": "worker.dlx"})
        except BrokerUnavailable as exc:
            log.error("dead letter lost with the broker", extra={"action": "worker.dlx", "error": str(exc)})

    async def _retry(self, what: str, attempt: Callable[[], Awaitable[T]]) -> T:
        return await retrying(
            what, attempt, self.stop, role="worker", on_outage=lambda: self.health.beat("worker")
        )

    async def _carry_out(self, command: PauseCommand) -> bool:
        """Carry out one command; True when it is finished (settle it), False to leave it."""
        claim = Claim(command.sandbox_id, command.generation)
        backing = await self._retry("backing", lambda: self.backing.submit(claim))
        if not backing.backed:
            self._dropped(claim, "not_backed")
            return True
        busy = await self._busy(claim.sandbox_id)
        self.waiting_for_slot += 1
        try:
            await self.slots.acquire()
        finally:
            self.waiting_for_slot -= 1
        try:
            return await self._pause(claim, backing, busy)
        finally:
            self.slots.release()

    def _saturated(self) -> bool:
        """A batch of checked commands already waits for a slot: a longer CPU check delays none."""
        return self.waiting_for_slot >= METRICS_BATCH

    async def _pause(self, claim: Claim, backing: Backing, busy: bool) -> bool:
        settings = self.settings
        attempt, called = 1, False
        while True:
            step = await self._attempt(claim, attempt, backing, busy, called)
            if step.finished:
                return True
            if step.wait is not None:
                # Another attempt holds the row (a copy of this command, or a worker that died
                # in its call): wait until its hold ends, then look again. Never two calls at once.
                if await sleep_or_stop(self.stop, step.wait):
                    return False
                continue
            called = called or step.called
            delay = backoff_delay(attempt, settings.retry_base_delay, settings.retry_max_delay)
            if await sleep_or_stop(self.stop, delay):
                return False
            attempt += 1

    async def _attempt(
        self, claim: Claim, attempt: int, backing: Backing, busy: bool, called_before: bool
    ) -> Step:
        """One attempt of ``claim``, numbered ``attempt``; what to do next."""
        settings = self.settings
        attempt_id = uuid.uuid4()
        took = await self._retry("compare-and-set", lambda: self.begins.submit((claim, attempt_id, attempt)))
        if not took.taken and took.backed:
            metrics.COMMANDS_DROPPED.labels("in_flight_elsewhere").inc()
            return Step(wait=min(took.held_for, settings.attempt_hold) + 0.05)
        if not took.taken:
            self._dropped(claim, "not_backed" if attempt == 1 else "superseded")
            return Step(finished=True)
        result: CallResult | None = None
        end_at, read_at, called = None, datetime.now(UTC), False
        if not settings.dry_run and not busy:
            calls = await self._call_e2b(claim, attempt_id, backing)
            if calls is None:  # the hold ran out while the rate limiter made us wait: look again
                return Step(wait=0.0)
            result, end_at, read_at, called = calls
        decision = decide(
            result.outcome if result else None,
            attempt=attempt,
            max_attempts=settings.pause_max_attempts,
            dry_run=settings.dry_run,
            busy=busy,
        )
        if decision.to_state is None:
            assert result is not None
            error = result.error or "retryable"
            await self._retry(
                "attempt record", lambda: self.store.record_attempt(claim, attempt_id, attempt, error)
            )
            return Step(called=called)
        end = pause_end(
            decision,
            attempt=attempt,
            now=datetime.now(UTC),
            idle_timeout_s=took.idle_timeout_s or settings.default_idle_timeout,
            retry_after_s=settings.retry_after,
            error=result.error if result else None,
            end_at=end_at,
            read_at=read_at,
            called_pause=called_before or called,
        )
        finished = await self._finish(claim, attempt_id, end, decision, result)
        if must_repair(result.outcome if result else None, finished):
            await self.repairer.repair_own(claim.sandbox_id, attempt_id)
        return Step(finished=True)

    def _dropped(self, claim: Claim, reason: str) -> None:
        metrics.COMMANDS_DROPPED.labels(reason).inc()
        log.info(
            "command not carried out",
            extra={"action": "worker.drop", "sandbox_id": claim.sandbox_id, "reason": reason},
        )

    async def _busy(self, sandbox_id: str) -> bool:
        """E2B's latest CPU sample says the sandbox works (see consumer/busy.py)."""
        settings = self.settings
        if settings.busy_cpu_percent <= 0 or settings.dry_run:
            return False
        sample = await self.cpu.sample(sandbox_id)
        return is_busy(sample, datetime.now(UTC), settings.busy_cpu_percent, settings.busy_cpu_sample_age)

    async def _call_e2b(
        self, claim: Claim, attempt_id: uuid.UUID, backing: Backing
    ) -> tuple[CallResult, datetime | None, datetime, bool] | None:
        """The sandbox's end of life (from a recent listing, else get_info), then the pause:
        (the result, the end of life, when it was read, whether a pause call was made).

        None when the attempt's hold ran out while it waited for the rate limiter.
        """
        sandbox_id = claim.sandbox_id
        now = datetime.now(UTC)
        end_at: datetime | None = backing.end_at
        read_at = now
        seen = backing.seen_at
        listed = seen is not None and (now - seen).total_seconds() <= self.settings.end_at_max_age
        if end_at is None or not listed:
            if not await self._token_within_hold(claim, attempt_id):
                return None
            info = await self._e2b("info", lambda: self.client.info(sandbox_id))
            read_at = datetime.now(UTC)
            if info.outcome is not CallOutcome.OK or info.sandbox is None:
                return info, None, read_at, False
            if info.sandbox.state == "paused":
                already = CallResult(CallOutcome.ALREADY_PAUSED, None, info.latency)
                return already, info.sandbox.end_at, read_at, False
            end_at = info.sandbox.end_at
        if not await self._token_within_hold(claim, attempt_id):
            return None
        return await self._e2b("pause", lambda: self.client.pause(sandbox_id)), end_at, read_at, True

    async def _token_within_hold(self, claim: Claim, attempt_id: uuid.UUID) -> bool:
        """Wait for a rate-limiter token; after a long wait, renew the attempt's hold first.

        The hold covers the calls at their bound, not the wait: a call may start
        only while its attempt still holds the row.
        """
        waited = await self.bucket.take()
        metrics.RATE_LIMIT_WAIT.observe(waited)
        if waited < 1.0:
            return True
        return await self._retry(
            "hold renewal", lambda: self.store.renew_attempt(claim, attempt_id, self.settings.attempt_hold)
        )

    async def _e2b(self, operation: str, call: Callable[[], Awaitable[CallResult]]) -> CallResult:
        """One E2B request (its rate-limiter token already taken), measured."""
        result = await call()
        metrics.E2B_LATENCY.labels(operation).observe(result.latency)
        if operation == "pause":
            metrics.PAUSE_CALLS.labels(result.outcome.value).inc()
        return result

    async def _finish(
        self,
        claim: Claim,
        attempt_id: uuid.UUID,
        end: PauseEnd,
        decision: Decision,
        result: CallResult | None,
    ) -> PauseFinished:
        """Write the outcome; announce it when the row moved."""
        finished = await self._retry("outcome", lambda: self.finishes.submit((claim, attempt_id, end)))
        metrics.PAUSES.labels(end.reason if finished.moved else "superseded").inc()
        if end.reason is Reason.BUSY_CPU and finished.moved:
            metrics.BUSY_CPU.inc()
        if finished.moved:
            metrics.TRANSITIONS.labels("worker", end.to_state.value, end.reason).inc()
            if decision.outcome is not None:
                await self._announce(claim, decision.outcome, result.error if result else None)
        log.info(
            "pause finished",
            extra={
                "action": "worker.finish",
                "sandbox_id": claim.sandbox_id,
                "result": end.reason,
                "row_moved": finished.moved,
            },
        )
        return finished

    async def _announce(self, claim: Claim, outcome_type: OutcomeType, error: str | None) -> None:
        """Tell app services what became of the sandbox (best effort: the row is the truth)."""
        assert self.outcomes is not None
        outcome = Outcome(
            event_id=uuid.uuid4(),
            type=outcome_type,
            occurred_at=datetime.now(UTC),
            sandbox_id=claim.sandbox_id,
            generation=claim.generation,
            dry_run=self.settings.dry_run,
            error=error[:500] if error else None,
        )
        try:
            await self.outcomes.publish([Outgoing(outcome_type, outcome.model_dump_json().encode())])
        except BrokerUnavailable as exc:
            log.warning(
                "outcome not published", extra={"action": "worker.announce_failed", "error": str(exc)}
            )

    # batches: one statement (or one ack frame) for what concurrent commands ask at once

    async def _begin_batch(self, items: list[tuple[Claim, uuid.UUID, int]]) -> Sequence[Attempt]:
        return await distinct_rounds(
            items, _sandbox_of, lambda part: self.store.begin_attempts(part, self.settings.attempt_hold)
        )

    async def _finish_batch(self, items: list[tuple[Claim, uuid.UUID, PauseEnd]]) -> Sequence[PauseFinished]:
        return await distinct_rounds(items, _sandbox_of, self.store.finish_pauses)

    async def _settle_batch(self, deliveries: list[Delivery]) -> Sequence[None]:
        assert self.consumer is not None
        await self.consumer.settle(deliveries)
        return [None] * len(deliveries)


def _sandbox_of(item: tuple[Claim, uuid.UUID, object]) -> str:
    return item[0].sandbox_id

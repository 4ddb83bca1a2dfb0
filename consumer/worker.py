"""The worker role: carries out pause commands through the E2B adapter, concurrently.

Per command and attempt: a compare-and-set takes the row (it must be PAUSING
with the command's generation, and no other attempt may hold it, so a copy of
the command never calls E2B at the same time); E2B is asked for the sandbox
(its state and end of life), then told to pause it; the outcome is written by
a second compare-and-set. A command the row does not back is dropped with no
E2B call. Retryable failures back off with jitter, a bounded number of times;
then the row goes back to RUNNING with ``last_error`` and a ``retry_after``.

A pause that raced with activity is repaired at once: when the closing
compare-and-set finds the row RUNNING, the worker resumes the sandbox (with the
lifetime it had left) and records ``paused_in_use``. Activity that lands after
the pause was written is flagged on the row by ingest; every worker looks for
such rows each ``repair_interval`` and does the same.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from pydantic import ValidationError

from consumer import metrics
from consumer.broker import Broker, Consumer, DeadLetter, Delivery, Outgoing, Publisher
from consumer.busy import CpuProbe, is_busy
from consumer.e2b_adapter import CallOutcome, CallResult, E2BClient, SandboxView
from consumer.errors import BrokerUnavailable, StoreUnavailable
from consumer.health import Health
from consumer.ratelimit import TokenBucket
from consumer.retrying import Stopping, retrying, sleep_or_stop
from consumer.settings import Settings
from consumer.state import State
from consumer.store import Claim, PauseEnd, Repair, Store
from consumer.timing import backoff_delay
from schemas import COMMAND_ADAPTER, Outcome, PauseCommand

log = logging.getLogger(__name__)
T = TypeVar("T")

# A dry-run claim parks the row until newer activity moves its deadline, or a live scheduler.
PARKED = datetime(9999, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Decision:
    """What to do after one pause attempt."""

    to_state: State | None  # None: retry
    reason: str
    outcome_type: str | None = None


def decide(result: CallResult, attempt: int, max_attempts: int) -> Decision:
    """Pure: the next step for a pause result on ``attempt`` (1-based)."""
    match result.outcome:
        case CallOutcome.PAUSED:
            return Decision(State.PAUSED, "paused", "sandbox.paused")
        case CallOutcome.ALREADY_PAUSED:
            return Decision(State.PAUSED, "already_paused", "sandbox.paused")
        case CallOutcome.GONE:
            return Decision(State.KILLED, "gone", "sandbox.gone")
        case CallOutcome.RETRYABLE if attempt < max_attempts:
            return Decision(None, "retry")
        case _:
            return Decision(State.RUNNING, "pause_failed", "sandbox.pause_failed")


@dataclass(frozen=True)
class Step:
    """After one attempt: the command is finished, or wait (another attempt holds the row), or retry."""

    finished: bool = False
    called: bool = False  # a pause call was made, so E2B may have paused the sandbox
    wait: float | None = None


def lifetime_left(view: SandboxView | None, read_at: datetime) -> float | None:
    """Seconds of life the sandbox had when E2B was asked, or None when unknown."""
    if view is None or view.end_at is None:
        return None
    return max(0.0, (view.end_at - read_at).total_seconds())


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
        self.cpu = CpuProbe(client, bucket)
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
        self.consumer = await self.broker.consumer(
            names.pause_queue,
            prefetch=self.settings.worker_concurrency,
            on_delivery=self._on_delivery,
            role="worker",
        )
        repairs = asyncio.create_task(self._repair_forever(stop), name="worker-repairs")
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
        assert self.consumer is not None
        try:
            command = COMMAND_ADAPTER.validate_json(delivery.body)
        except ValidationError as exc:
            metrics.COMMANDS_DROPPED.labels("invalid").inc()
            detail = str(exc.errors()[0]["msg"])[:500]
            log.warning("invalid pause command", extra={"action": "worker.invalid", "error": detail})
            await self._dead_letter(DeadLetter(delivery, "invalid_command", detail))
            return
        try:
            finished = await self._pause(command)
        except Stopping:
            return  # unsettled: the broker delivers it again
        except Exception as exc:
            log.error("pause handler failed", exc_info=exc, extra={"action": "worker.crash"})
            await self._dead_letter(
                DeadLetter(delivery, "worker_error", f"{type(exc).__name__}: {exc}"[:500])
            )
            return
        if finished:
            await self.consumer.settle([delivery])

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

    async def _pause(self, command: PauseCommand) -> bool:
        """Carry out one command; True when it is finished (settle it), False to leave it."""
        claim = Claim(command.sandbox_id, command.generation)
        settings = self.settings
        attempt, called = 1, False
        while True:
            step = await self._attempt(claim, attempt, called)
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

    async def _attempt(self, claim: Claim, attempt: int, called_before: bool) -> Step:
        """One attempt of ``claim``, numbered ``attempt``; what to do next."""
        settings = self.settings
        attempt_id = uuid.uuid4()
        took = await self._retry(
            "compare-and-set",
            lambda: self.store.begin_attempt(claim, attempt_id, settings.attempt_hold, attempt),
        )
        if not took.taken and took.backed:
            metrics.COMMANDS_DROPPED.labels("in_flight_elsewhere").inc()
            return Step(wait=min(took.held_for, settings.attempt_hold) + 0.05)
        if not took.taken:
            self._dropped(claim, "not_backed" if attempt == 1 else "superseded")
            return Step(finished=True)
        if settings.dry_run:
            end = PauseEnd(State.RUNNING, "dry_run", attempt, due_at=PARKED, dry_run_at=datetime.now(UTC))
            await self._finish(claim, attempt_id, end, Decision(State.RUNNING, "dry_run", "sandbox.paused"))
            return Step(finished=True)
        if await self._busy(claim.sandbox_id):
            timeout = took.idle_timeout_s or settings.default_idle_timeout
            due = datetime.now(UTC) + timedelta(seconds=timeout)
            metrics.BUSY_CPU.inc()
            await self._finish(
                claim,
                attempt_id,
                PauseEnd(State.RUNNING, "busy_cpu", attempt, due_at=due),
                Decision(State.RUNNING, "busy_cpu"),
            )
            return Step(finished=True)
        calls = await self._call_e2b(claim, attempt_id)
        if calls is None:  # the hold ran out while the rate limiter made us wait: look again
            return Step(wait=0.0)
        result, view, read_at = calls
        called = view is not None and view.state != "paused"
        decision = decide(result, attempt, settings.pause_max_attempts)
        if decision.to_state is None:
            error = result.error or "retryable"
            await self._retry(
                "attempt record", lambda: self.store.record_attempt(claim, attempt_id, attempt, error)
            )
            return Step(called=called)
        end = self._end(decision, attempt, result, view, read_at, called_before or called)
        finished = await self._finish(claim, attempt_id, end, decision, result.error)
        if finished is State.RUNNING and result.outcome in (CallOutcome.PAUSED, CallOutcome.ALREADY_PAUSED):
            await self._repair_own(claim.sandbox_id, attempt_id)
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
        if settings.busy_cpu_percent <= 0:
            return False
        sample = await self.cpu.sample(sandbox_id)
        return is_busy(sample, datetime.now(UTC), settings.busy_cpu_percent, settings.busy_cpu_sample_age)

    async def _call_e2b(
        self, claim: Claim, attempt_id: uuid.UUID
    ) -> tuple[CallResult, SandboxView | None, datetime] | None:
        """Ask E2B for the sandbox, then pause it if it runs: (result, what E2B said, when).

        None when the attempt's hold ran out while it waited for the rate limiter.
        """
        sandbox_id = claim.sandbox_id
        if not await self._token_within_hold(claim, attempt_id):
            return None
        info = await self._e2b("info", lambda: self.client.info(sandbox_id))
        read_at = datetime.now(UTC)
        if info.outcome is not CallOutcome.OK or info.sandbox is None:
            return info, None, read_at
        if info.sandbox.state == "paused":
            return CallResult(CallOutcome.ALREADY_PAUSED, None, info.latency), info.sandbox, read_at
        if not await self._token_within_hold(claim, attempt_id):
            return None
        result = await self._e2b("pause", lambda: self.client.pause(sandbox_id))
        return result, info.sandbox, read_at

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

    def _end(
        self,
        decision: Decision,
        attempt: int,
        result: CallResult,
        view: SandboxView | None,
        read_at: datetime,
        called_pause: bool,
    ) -> PauseEnd:
        assert decision.to_state is not None
        retry_after = None
        if decision.reason == "pause_failed":
            retry_after = datetime.now(UTC) + timedelta(seconds=self.settings.retry_after)
        return PauseEnd(
            decision.to_state,
            decision.reason,
            attempt,
            error=result.error,
            retry_after=retry_after,
            due_at=retry_after,
            end_at=view.end_at if view else None,
            lifetime_left_s=lifetime_left(view, read_at),
            # a pause call that timed out may have paused it all the same: let a repair look
            check_e2b_later=decision.reason == "pause_failed" and called_pause,
        )

    async def _finish(
        self, claim: Claim, attempt_id: uuid.UUID, end: PauseEnd, decision: Decision, error: str | None = None
    ) -> State | None:
        """Write the outcome; the row's state when it did not move (None when it did)."""
        finished = await self._retry("outcome", lambda: self.store.finish_pause(claim, attempt_id, end))
        metrics.PAUSES.labels(end.reason if finished.moved else "superseded").inc()
        if finished.moved:
            metrics.TRANSITIONS.labels("worker", end.to_state.value, end.reason).inc()
        log.info(
            "pause finished",
            extra={
                "action": "worker.finish",
                "sandbox_id": claim.sandbox_id,
                "result": end.reason,
                "row_moved": finished.moved,
            },
        )
        if not finished.moved:
            return finished.state
        if decision.outcome_type is not None:
            await self._announce(claim, decision.outcome_type, error)
        return None

    async def _announce(self, claim: Claim, outcome_type: str, error: str | None) -> None:
        """Tell app services what became of the sandbox (best effort: the row is the truth)."""
        assert self.outcomes is not None
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
            await self.outcomes.publish([Outgoing(outcome_type, outcome.model_dump_json().encode())])
        except BrokerUnavailable as exc:
            log.warning(
                "outcome not published", extra={"action": "worker.announce_failed", "error": str(exc)}
            )

    # repairs: sandboxes a pause hit while in use

    async def _repair_own(self, sandbox_id: str, attempt_id: uuid.UUID) -> None:
        """Our pause raced with activity: resume the sandbox now, under the attempt we hold."""
        try:
            repair = await self.store.take_own_repair(sandbox_id, attempt_id, self.settings.attempt_hold)
        except StoreUnavailable as exc:
            log.error("repair left to the next round", extra={"action": "worker.repair", "error": str(exc)})
            return
        if repair is not None:
            await self._repair(repair, attempt_id)

    async def _repair_forever(self, stop: asyncio.Event) -> None:
        """Every ``repair_interval``, repair the rows ingest flagged. Failure policy: log, next round."""
        while not stop.is_set():
            holder = uuid.uuid4()
            try:
                repairs = await self.store.take_repairs(
                    holder, self.settings.attempt_hold, self.settings.worker_concurrency
                )
            except StoreUnavailable as exc:
                log.error("repairs not read", extra={"action": "worker.repair", "error": str(exc)})
                repairs = []
            except Exception as exc:  # the next round tries again; a repair loop never stops
                log.error("repairs not read", exc_info=exc, extra={"action": "worker.repair"})
                repairs = []
            if repairs:
                await asyncio.gather(*(self._repair(r, holder) for r in repairs), return_exceptions=True)
            if await sleep_or_stop(stop, self.settings.repair_interval):
                return

    async def _repair(self, repair: Repair, holder: uuid.UUID) -> None:
        """Ask E2B; resume the sandbox if a pause left it paused while in use."""
        sid = repair.sandbox_id
        try:
            metrics.RATE_LIMIT_WAIT.observe(await self.bucket.take())
            info = await self._e2b("info", lambda: self.client.info(sid))
            if info.outcome is CallOutcome.GONE:
                await self.store.finish_repair(sid, holder, "gone", None)
                return
            if info.outcome is not CallOutcome.OK or info.sandbox is None:
                await self.store.delay_repair(sid, holder, self.settings.retry_base_delay * 4)
                return
            if info.sandbox.state != "paused":
                await self.store.finish_repair(sid, holder, "running", None)
                return
            lifetime = repair.lifetime_left_s or float(self.settings.resume_timeout)
            metrics.RATE_LIMIT_WAIT.observe(await self.bucket.take())
            resumed = await self._e2b("connect", lambda: self.client.resume(sid, lifetime))
            if resumed.outcome is CallOutcome.OK:
                await self._record_repair(repair, holder, lifetime)
            elif resumed.outcome is CallOutcome.GONE:
                await self.store.finish_repair(sid, holder, "gone", None)
            else:
                await self.store.delay_repair(sid, holder, self.settings.retry_base_delay * 4)
        except StoreUnavailable as exc:
            # the row stays flagged; its hold runs out and the next round takes it again
            log.error("repair not recorded", extra={"action": "worker.repair", "error": str(exc)})
        except Exception as exc:  # the same: the flag stays, the next round takes it again
            log.error("repair failed", exc_info=exc, extra={"action": "worker.repair", "sandbox_id": sid})

    async def _record_repair(self, repair: Repair, holder: uuid.UUID, lifetime: float) -> None:
        detail = {
            "claimed_activity": repair.claimed_activity.isoformat() if repair.claimed_activity else None,
            "activity_at": repair.last_activity.isoformat(),
            "lifetime_s": round(lifetime, 1),
        }
        # no claim of ours saw the row when it was paused outside (E2B's own timeout)
        reason = "paused_in_use" if repair.claimed_activity is not None else "resumed_for_use"
        if await self.store.finish_repair(repair.sandbox_id, holder, reason, detail):
            metrics.TRANSITIONS.labels("worker", State.RUNNING.value, reason).inc()
            if reason == "paused_in_use":
                metrics.PAUSED_IN_USE.inc()
            log.warning(
                "a paused sandbox was in use; resumed it",
                extra={"action": f"worker.{reason}", "sandbox_id": repair.sandbox_id, **detail},
            )

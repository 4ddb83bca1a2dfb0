"""The scheduler role: an aiocron tick that claims idle sessions and publishes pause commands.

A tick runs once across all replicas (a row per scheduled time in
``scheduler_ticks``) and does not overlap another (a lease row in
``run_leases``, taken in the same statement that records the tick). A tick
with nothing due costs three round trips: begin, probe, finish. It claims only
what ingest can vouch for (:func:`freshness_gate`): with no ingest consuming,
beating and committing its watermark, it claims nothing and records why.
Claims are committed before their commands are published; a command the
broker does not confirm releases its claim at once, and one lost after its
confirm is published again when its lease runs out.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aiocron

from consumer import metrics
from consumer.broker import PAUSE_ROUTING_KEY, Broker, Names, Outgoing, Publisher, QueueState, queue_limits
from consumer.errors import BrokerUnavailable, StoreUnavailable
from consumer.health import Health
from consumer.settings import Settings
from consumer.state import Reason
from consumer.store import Claim, IngestView, Store
from consumer.timing import iter_ticks
from schemas import CommandReason, PauseCommand

log = logging.getLogger(__name__)

# Seconds between the sweeps a tick need not make every time (retention, gauges...).
MAINTENANCE_EVERY = 60.0
# Seconds a replica holds the tick lease; a replica that dies mid-tick delays the
# next ticks by at most this much. A longer tick is safe: claims are row-locked.
TICK_LEASE = 30.0


@dataclass(frozen=True)
class TickResult:
    claimed: int = 0
    republished: int = 0
    expired: int = 0
    skipped: str | None = None
    error: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Gate:
    """Whether a tick may claim, and up to which deadline; with the figures it judged by."""

    claim_until: datetime | None
    skipped: str | None
    detail: dict[str, Any]


def freshness_gate(
    view: IngestView,
    events: QueueState,
    *,
    stale_after: float,
    max_lag: float,
    backlog_limit: int,
) -> Gate:
    """Pure: may the tick claim, given the ingest replicas' rows and the events queue?

    Claims need ingest to demonstrably keep up: a consumer on the events queue,
    every consumer beating recently, a watermark on every replica row (also on
    rows that went silent but have not retired: what they held went back to the
    queue), no redelivered event in hand, and no deeper backlog than allowed.
    A deadline is then claimable only up to the oldest watermark: every event
    published before it has been committed.
    """
    now = view.now
    fresh = [r for r in view.replicas if (now - r.beat_at).total_seconds() <= stale_after]
    held = sum(r.held for r in fresh)
    marks = [r.watermark for r in view.replicas if r.watermark is not None]
    watermark = min(marks) if marks and len(marks) == len(view.replicas) else None
    detail: dict[str, Any] = {
        "consumers": events.consumers,
        "ready": events.ready,
        "held": held,
        "replicas": len(view.replicas),
        "fresh": len(fresh),
        "watermark_age_s": round((now - watermark).total_seconds(), 3) if watermark else None,
    }

    def refuse(skipped: str, why: str) -> Gate:
        return Gate(None, skipped, {**detail, "why": why})

    if events.consumers == 0:
        return refuse("ingest_stale", "no consumer on the events queue")
    if not fresh:
        return refuse("ingest_stale", f"no ingest heartbeat in the last {stale_after:g} s")
    if events.consumers > len(fresh):
        return refuse("ingest_stale", "a consumer of the events queue has no recent heartbeat")
    if watermark is None:
        return refuse("ingest_stale", "an ingest replica has committed no watermark yet")
    if (now - watermark).total_seconds() > max_lag:
        return refuse("ingest_stale", f"the ingest watermark is older than {max_lag:g} s")
    if any(r.held_redelivered for r in fresh):
        return refuse("ingest_stale", "redelivered events are in hand")
    if events.ready + held > backlog_limit:
        return refuse("backlog", f"{events.ready + held} events wait or are in hand")
    return Gate(watermark, None, detail)


def claim_budget(running: int, share: float, hard_cap: int, floor: int) -> int:
    """The storm breaker: how many sessions one tick may claim out of ``running``."""
    return max(0, min(hard_cap, running, max(floor, int(running * share))))


def scheduled_time(spec: str, now: datetime, tolerance: timedelta = timedelta(seconds=5)) -> datetime:
    """The fire time of ``spec`` that a tick starting at ``now`` belongs to.

    aiocron wakes a little after the scheduled second; every replica rounds to
    the same fire time, which then deduplicates the tick in Postgres.
    """
    best: datetime | None = None
    for fire in iter_ticks(spec, now - tolerance):
        if best is None or abs(fire - now) < abs(best - now):
            best = fire
        if fire > now:
            break
    assert best is not None
    return best


def pause_command(claim: Claim, reason: CommandReason) -> tuple[str, bytes, str]:
    """(routing key, body, message id) of the command for one claim."""
    command = PauseCommand(
        command_id=uuid.uuid4(),
        sandbox_id=claim.sandbox_id,
        generation=claim.generation,
        issued_at=datetime.now(UTC),
        reason=reason,
    )
    return PAUSE_ROUTING_KEY, command.model_dump_json().encode(), str(command.command_id)


class Scheduler:
    """One scheduler replica."""

    def __init__(self, settings: Settings, store: Store, broker: Broker, health: Health) -> None:
        self.settings = settings
        self.store = store
        self.broker = broker
        self.health = health
        self.names = Names(settings.topology_prefix)
        self.limits = queue_limits(settings)
        self.replica = f"{socket.gethostname()}:{os.getpid()}"
        self.lock_name = f"autopause.tick.{settings.database_schema}.{settings.topology_prefix}"
        self.running = asyncio.Lock()
        self.commands: Publisher | None = None
        self.current: asyncio.Task[TickResult] | None = None
        self.maintained_at = float("-inf")

    async def run(self, stop: asyncio.Event, *, once: bool = False) -> None:
        self.commands = await self.broker.publisher(self.names.commands_exchange, confirm=True)
        self.health.set("scheduler", True)
        self.health.beat("scheduler")
        metrics.AUTO_PAUSE_ENABLED.set(1 if self.settings.auto_pause_enabled else 0)
        if once:
            result = await self.tick(datetime.now(UTC))
            log.info("tick done", extra={"action": "scheduler.once", **result.__dict__})
            await self.commands.close()
            return
        cron = aiocron.Cron(self.settings.tick_cron, self._fire, start=True, tz=UTC)
        log.info(
            "scheduler started",
            extra={"action": "scheduler.start", "cron": self.settings.tick_cron},
        )
        try:
            while not stop.is_set():
                self.health.beat("scheduler")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=10)
        finally:
            cron.stop()
            if self.current is not None and not self.current.done():
                with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                    await asyncio.wait_for(asyncio.shield(self.current), self.settings.shutdown_grace)
            await self.commands.close()

    def _fire(self) -> None:
        """aiocron's callback: start a tick unless the previous one is still running."""
        if self.running.locked():
            metrics.TICKS.labels("overlap").inc()
            log.warning("previous tick still running, skipped", extra={"action": "scheduler.overlap"})
            return
        tick_at = scheduled_time(self.settings.tick_cron, datetime.now(UTC))
        self.current = asyncio.create_task(self.tick(tick_at), name=f"tick-{tick_at:%H%M%S}")

    async def tick(self, tick_at: datetime) -> TickResult:
        """One tick; never raises (its failure policy: record, log, try again next tick)."""
        started = time.perf_counter()
        async with self.running:
            try:
                result = await self._tick(tick_at)
            except StoreUnavailable as exc:
                result = TickResult(error=f"database: {exc}")
            except Exception as exc:  # a tick must never take the cron down with it
                result = TickResult(error=f"{type(exc).__name__}: {exc}")
        outcome = result.skipped or ("error" if result.error else "ran")
        metrics.TICKS.labels(outcome).inc()
        metrics.TICK_SECONDS.observe(time.perf_counter() - started)
        if not result.error:
            metrics.LAST_TICK_SUCCESS.set(time.time())
        self.health.beat("scheduler")
        level = logging.ERROR if result.error else logging.INFO
        log.log(
            level,
            "tick",
            extra={"action": "scheduler.tick", "tick_at": tick_at.isoformat(), **result.__dict__},
        )
        return result

    async def _tick(self, tick_at: datetime) -> TickResult:
        begun = await self.store.begin_tick(self.lock_name, tick_at, self.replica, TICK_LEASE)
        if not begun.leased:
            return TickResult(skipped="busy")
        if not begun.started:
            return TickResult(skipped="taken")
        try:
            result = await self._work()
        except StoreUnavailable:
            with contextlib.suppress(StoreUnavailable):  # else the lease runs out by itself
                await self.store.release_lease(self.lock_name, self.replica)
            raise
        except Exception as exc:  # recorded in the tick's row, then in the log
            result = TickResult(error=f"{type(exc).__name__}: {exc}")
        await self.store.finish_tick(
            self.lock_name,
            self.replica,
            tick_at,
            claimed=result.claimed,
            republished=result.republished,
            expired=result.expired,
            skipped=result.skipped,
            error=result.error,
            detail=result.detail or None,
        )
        return result

    async def _work(self) -> TickResult:
        settings = self.settings
        # the sweeps first: leaving dry run makes parked rows due for this very tick
        expired = await self._maintain() if self._maintenance_due() else 0
        probe = await self.store.renew_leases_and_probe(settings.pause_lease, settings.claim_batch_size)
        republished, error = await self._renew_leases(probe.renewed)
        done = TickResult(republished=republished, expired=expired, error=error)
        if not settings.auto_pause_enabled:
            return dataclasses.replace(done, skipped="disabled")
        now, first_due = probe.now, probe.first_due
        if first_due is None or first_due > now:
            # nothing is due: the common tick ends after one probe of the idle index
            wait = round((first_due - now).total_seconds(), 3) if first_due is not None else None
            return dataclasses.replace(done, detail={"next_due_in_s": wait})
        events = await self._sample(self.names.events_queue)
        view = await self.store.ingest_view()
        gate = freshness_gate(
            view,
            events,
            stale_after=settings.ingest_stale_after,
            max_lag=settings.ingest_max_lag,
            backlog_limit=settings.events_backlog_limit,
        )
        age = gate.detail["watermark_age_s"]
        if age is not None:
            metrics.WATERMARK_LAG.set(age)
        if gate.claim_until is None:
            log.warning(
                "ingest cannot vouch for idleness, claiming nothing",
                extra={"action": "scheduler.gate", "skipped": gate.skipped, **gate.detail},
            )
            return dataclasses.replace(done, skipped=gate.skipped, detail=gate.detail)
        claimed, claim_error = await self._claim(gate.claim_until)
        return dataclasses.replace(done, claimed=claimed, error=error or claim_error, detail=gate.detail)

    def _maintenance_due(self) -> bool:
        return time.monotonic() - self.maintained_at >= MAINTENANCE_EVERY

    async def _maintain(self) -> int:
        """What a tick need not do every time, done at most every MAINTENANCE_EVERY seconds:
        retention, rows a dry run parked, silent ingest rows, old tick records, the gauges.
        Returns the sessions retention expired."""
        settings = self.settings
        self.maintained_at = time.monotonic()
        expired = 0
        if settings.retention_days > 0:
            expired = await self.store.expire_paused(settings.retention_days, 100_000)
        if not settings.dry_run:
            await self.store.unpark_dry_run(settings.default_idle_timeout, 100_000)
        await self.store.retire_ingest(settings.ingest_retire_after)
        await self.store.prune_ticks()
        for state, count in (await self.store.count_by_state()).items():
            metrics.SESSIONS.labels(state).set(count)
        for queue in self.names.queues():
            await self._sample(queue)
        return expired

    async def _sample(self, queue: str) -> QueueState:
        """A queue's depth and consumers, into the gauges with its cap."""
        depth = await self.broker.queue_state(queue)
        metrics.QUEUE_MESSAGES.labels(queue).set(depth.ready)
        metrics.QUEUE_CONSUMERS.labels(queue).set(depth.consumers)
        if queue in self.limits:
            metrics.QUEUE_LIMIT.labels(queue).set(self.limits[queue])
        return depth

    async def _renew_leases(self, first: list[Claim]) -> tuple[int, str | None]:
        """Send again the commands of claims whose lease ran out, starting with the batch the
        tick's probe renewed; (how many went out, error)."""
        batch = self.settings.claim_batch_size
        republished = 0
        renewed = first
        while renewed:
            sent, error = await self._send(renewed, "lease_expired")
            republished += sent
            if error or len(renewed) < batch:
                return republished, error
            renewed = await self.store.renew_expired_leases(self.settings.pause_lease, batch)
        return republished, None

    async def _claim(self, until: datetime) -> tuple[int, str | None]:
        settings = self.settings
        budget = claim_budget(
            await self.store.running_count(),
            settings.claim_max_share,
            settings.claim_hard_cap,
            settings.claim_min_per_tick,
        )
        claimed = 0
        while claimed < budget:
            claims = await self.store.claim_idle(min(settings.claim_batch_size, budget - claimed), until)
            if not claims:
                break
            sent, error = await self._send(claims, "idle")
            claimed += sent
            if error:
                return claimed, error
        return claimed, None

    async def _send(self, claims: list[Claim], reason: CommandReason) -> tuple[int, str | None]:
        """Publish a command per claim; release at once the claims whose command did not go out."""
        assert self.commands is not None
        items = [Outgoing(*pause_command(claim, reason)) for claim in claims]
        error = None
        try:
            confirmed = await self.commands.publish(items)
        except BrokerUnavailable as exc:
            confirmed, error = [False] * len(claims), f"broker: {exc}"
        refused = [claim for claim, ok in zip(claims, confirmed, strict=True) if not ok]
        if refused:
            released = await self.store.release_claims(refused, Reason.PUBLISH_FAILED)
            metrics.CLAIMS_RELEASED.labels("publish_failed").inc(released)
            error = error or f"the broker refused {len(refused)} of {len(claims)} commands"
            log.error(
                "pause commands not published; their claims released",
                extra={"action": "scheduler.release", "released": released, "error": error},
            )
        sent = len(claims) - len(refused)
        metrics.CLAIMS.labels(reason).inc(sent)
        return sent, error

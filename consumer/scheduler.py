"""The scheduler role: an aiocron tick that claims idle sessions and publishes pause commands.

A tick runs once across all replicas (a row per scheduled time in
``scheduler_ticks``) and never overlaps another (an advisory lock held for its
whole length). Claims are committed before their commands are published; a
command lost in between is published again when its lease runs out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import aiocron
from aio_pika.abc import AbstractExchange, AbstractRobustConnection

from consumer import metrics
from consumer.broker import PAUSE_ROUTING_KEY, Names, message, publish_all, queue_depth
from consumer.errors import StoreUnavailable
from consumer.health import Health
from consumer.settings import Settings
from consumer.store import Claim, Store
from consumer.timing import iter_ticks
from schemas import PauseCommand

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TickResult:
    claimed: int = 0
    republished: int = 0
    expired: int = 0
    skipped: str | None = None
    error: str | None = None


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


def pause_command(claim: Claim, reason: str) -> tuple[str, bytes, str]:
    """(routing key, body, message id) of the command for one claim."""
    command = PauseCommand(
        command_id=uuid.uuid4(),
        sandbox_id=claim.sandbox_id,
        generation=claim.generation,
        issued_at=datetime.now(UTC),
        reason=reason,  # type: ignore[arg-type]
    )
    return PAUSE_ROUTING_KEY, command.model_dump_json().encode(), str(command.command_id)


async def publish_commands(exchange: AbstractExchange, claims: list[Claim], reason: str) -> None:
    """Publish one confirmed pause command per claim."""
    items = []
    for claim in claims:
        key, body, message_id = pause_command(claim, reason)
        items.append((key, message(body, message_id=message_id)))
    await publish_all(exchange, items)


class Scheduler:
    """One scheduler replica."""

    def __init__(
        self, settings: Settings, store: Store, connection: AbstractRobustConnection, health: Health
    ) -> None:
        self.settings = settings
        self.store = store
        self.connection = connection
        self.health = health
        self.names = Names(settings.topology_prefix)
        self.replica = f"{socket.gethostname()}:{os.getpid()}"
        self.lock_name = f"autopause.tick.{settings.database_schema}.{settings.topology_prefix}"
        self.running = asyncio.Lock()
        self.exchange: AbstractExchange | None = None
        self.current: asyncio.Task[TickResult] | None = None

    async def run(self, stop: asyncio.Event, *, once: bool = False) -> None:
        channel = await self.connection.channel(publisher_confirms=True)
        self.exchange = await channel.get_exchange(self.names.commands_exchange)
        self.health.set("scheduler", True)
        self.health.beat("scheduler")
        if once:
            result = await self.tick(datetime.now(UTC))
            log.info("tick done", extra={"action": "scheduler.once", **result.__dict__})
            await channel.close()
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
            if not channel.is_closed:
                await channel.close()

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
        self.health.beat("scheduler")
        level = logging.ERROR if result.error else logging.INFO
        log.log(
            level,
            "tick",
            extra={"action": "scheduler.tick", "tick_at": tick_at.isoformat(), **result.__dict__},
        )
        return result

    async def _tick(self, tick_at: datetime) -> TickResult:
        async with self.store.tick_lock(self.lock_name) as got:
            if not got:
                return TickResult(skipped="busy")
            if not await self.store.start_tick(tick_at, self.replica):
                return TickResult(skipped="taken")
            try:
                result = await self._work()
            except StoreUnavailable:
                raise
            except Exception as exc:  # recorded in the tick's row, then in the log
                result = TickResult(error=f"{type(exc).__name__}: {exc}")
            await self.store.finish_tick(
                tick_at,
                claimed=result.claimed,
                republished=result.republished,
                expired=result.expired,
                skipped=result.skipped,
                error=result.error,
            )
            for state, count in (await self.store.count_by_state()).items():
                metrics.SESSIONS.labels(state).set(count)
            return result

    async def _work(self) -> TickResult:
        assert self.exchange is not None
        settings = self.settings
        republished = 0
        while renewed := await self.store.renew_expired_leases(
            settings.pause_lease, settings.claim_batch_size
        ):
            await publish_commands(self.exchange, renewed, "lease_expired")
            republished += len(renewed)
            metrics.CLAIMS.labels("lease_expired").inc(len(renewed))
            if len(renewed) < settings.claim_batch_size:
                break
        expired = 0
        if settings.retention_days > 0:
            expired = await self.store.expire_paused(settings.retention_days, 100_000)
        if not settings.auto_pause_enabled:
            return TickResult(republished=republished, expired=expired, skipped="disabled")
        backlog, _ = await queue_depth(self.connection, self.names.events_queue)
        if backlog > settings.events_backlog_limit:
            log.warning(
                "events backlog too deep, claiming nothing",
                extra={"action": "scheduler.backlog", "backlog": backlog},
            )
            return TickResult(republished=republished, expired=expired, skipped="backlog")
        budget = claim_budget(
            await self.store.running_count(),
            settings.claim_max_share,
            settings.claim_hard_cap,
            settings.claim_min_per_tick,
        )
        claimed = 0
        while claimed < budget:
            claims = await self.store.claim_idle(min(settings.claim_batch_size, budget - claimed))
            if not claims:
                break
            await publish_commands(self.exchange, claims, "idle")
            claimed += len(claims)
            metrics.CLAIMS.labels("idle").inc(len(claims))
        return TickResult(claimed=claimed, republished=republished, expired=expired)

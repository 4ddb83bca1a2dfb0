"""Reconcile: the session table against E2B's own list of the team's sandboxes.

App services tell autopause what they know; E2B knows what runs. On its own
cron (``reconcile_cron``), deduplicated across replicas like the tick, one
worker lists every running and paused sandbox, page by page, through the same
rate limiter as its pauses, and repairs the table::

    E2B says          the row says                    the row becomes
    running           PAUSED                          RUNNING, deadline from now (resumed_outside)
    paused            RUNNING                         PAUSED, no pause sent (paused_outside)
    (not listed)      RUNNING, PAUSING or PAUSED      KILLED once get_info answers 404 (gone)
    running           (no row), metadata in scope     RUNNING, last activity now (adopted)

A listing that fails on any page changes nothing. A row written since the
listing started, or one with a pause call or a repair under way, is left for
the next run: the listing cannot speak for it. It runs in the worker role
because that role holds the E2B key and the rate limiter every E2B request
goes through.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

import aiocron

from consumer import metrics
from consumer.e2b_adapter import CallOutcome, E2BClient, SandboxView
from consumer.errors import E2BError, StoreUnavailable
from consumer.health import Health
from consumer.ratelimit import TokenBucket
from consumer.scheduler import scheduled_time
from consumer.settings import Settings
from consumer.state import State
from consumer.store import LiveRow, Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """What one listing means for the table."""

    resumed_outside: list[str] = field(default_factory=list)
    paused_outside: list[str] = field(default_factory=list)
    maybe_gone: list[str] = field(default_factory=list)
    adopt: list[SandboxView] = field(default_factory=list)


def in_scope(sandbox: SandboxView, scope: dict[str, str] | None) -> bool:
    """A stray sandbox is adopted only when it carries every key=value of the scope (None: never)."""
    if not scope:
        return False
    metadata = dict(sandbox.metadata)
    return all(metadata.get(key) == value for key, value in scope.items())


def plan(
    listed: list[SandboxView], rows: list[LiveRow], known: set[str], scope: dict[str, str] | None
) -> Plan:
    """Pure: compare E2B's listing with the live rows (``known``: every id the table has)."""
    e2b_state = {s.sandbox_id: s.state for s in listed}
    resumed, paused, gone = [], [], []
    for row in rows:
        if not row.settled:
            continue
        seen = e2b_state.get(row.sandbox_id)
        if seen is None:
            gone.append(row.sandbox_id)
        elif seen == "running" and row.state is State.PAUSED:
            resumed.append(row.sandbox_id)
        elif seen == "paused" and row.state is State.RUNNING:
            paused.append(row.sandbox_id)
    strays = [s for s in listed if s.state == "running" and s.sandbox_id not in known and in_scope(s, scope)]
    return Plan(sorted(resumed), sorted(paused), sorted(gone), strays)


@dataclass
class Outcome:
    """What one run did (or, in a dry run, would do)."""

    listed: int = 0
    requests: int = 0
    changes: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    skipped: str | None = None


class Reconciler:
    """Runs reconcile on its cron, or once."""

    def __init__(
        self, settings: Settings, store: Store, client: E2BClient, bucket: TokenBucket, health: Health
    ) -> None:
        self.settings = settings
        self.store = store
        self.client = client
        self.bucket = bucket
        self.health = health
        self.replica = f"{socket.gethostname()}:{os.getpid()}"
        self.lock_name = f"autopause.reconcile.{settings.database_schema}.{settings.topology_prefix}"
        self.running = asyncio.Lock()
        self.current: asyncio.Task[Outcome] | None = None

    async def run_forever(self, stop: asyncio.Event) -> None:
        """Reconcile on ``reconcile_cron`` until ``stop``. Failure policy: a run never raises."""
        cron = aiocron.Cron(self.settings.reconcile_cron, self._fire, start=True, tz=UTC)
        try:
            await stop.wait()
        finally:
            cron.stop()
            if self.current is not None and not self.current.done():
                with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                    await asyncio.wait_for(asyncio.shield(self.current), self.settings.shutdown_grace)

    def _fire(self) -> None:
        if self.running.locked():
            return  # the previous run is still going: this fire time is skipped
        run_at = scheduled_time(self.settings.reconcile_cron, datetime.now(UTC))
        self.current = asyncio.create_task(self.run(run_at), name=f"reconcile-{run_at:%H%M%S}")

    async def run(self, run_at: datetime, *, dry_run: bool = False) -> Outcome:
        """One run for the fire time ``run_at`` (once across replicas); never raises."""
        async with self.running:
            try:
                outcome = await self._deduplicated(run_at, dry_run)
            except StoreUnavailable as exc:
                outcome = Outcome(error=f"database: {exc}")
            except Exception as exc:  # a run must never take the cron down with it
                log.error("reconcile failed", exc_info=exc, extra={"action": "reconcile.crash"})
                outcome = Outcome(error=f"{type(exc).__name__}: {exc}")
        result = outcome.skipped or ("error" if outcome.error else "ran")
        metrics.RECONCILE_RUNS.labels(result).inc()
        log.log(
            logging.ERROR if outcome.error else logging.INFO,
            "reconcile",
            extra={
                "action": "reconcile.run",
                "run_at": run_at.isoformat(),
                "dry_run": dry_run,
                **vars(outcome),
            },
        )
        return outcome

    async def _deduplicated(self, run_at: datetime, dry_run: bool) -> Outcome:
        if dry_run:
            return await self._reconcile(dry_run=True)
        async with self.store.advisory_lock(self.lock_name) as got:
            if not got:
                return Outcome(skipped="busy")
            if not await self.store.start_reconcile(run_at, self.replica):
                return Outcome(skipped="taken")
            outcome = await self._reconcile(dry_run=False)
            await self.store.finish_reconcile(
                run_at,
                listed=outcome.listed,
                requests=outcome.requests,
                changes=outcome.changes,
                error=outcome.error,
            )
            return outcome

    async def _reconcile(self, *, dry_run: bool) -> Outcome:
        outcome = Outcome()
        listed_at = await self.store.db_now()

        async def before_page() -> None:
            metrics.RATE_LIMIT_WAIT.observe(await self.bucket.take())
            outcome.requests += 1

        try:
            listed = await self.client.list_sandboxes(before_page)
        except E2BError as exc:
            # a listing that failed on any page says nothing about what it did not reach
            outcome.error = f"listing failed after {outcome.requests} requests: {exc}"
            return outcome
        outcome.listed = len(listed)
        rows = await self.store.reconcile_view([s.sandbox_id for s in listed], listed_at)
        scope = self.settings.reconcile_scope
        candidates = [s.sandbox_id for s in listed if s.state == "running" and in_scope(s, scope)]
        known = await self.store.known_sandboxes(candidates) if candidates else set()
        found = plan(listed, rows, known, scope)
        if dry_run:
            outcome.changes = {
                "resumed_outside": len(found.resumed_outside),
                "paused_outside": len(found.paused_outside),
                "maybe_gone": len(found.maybe_gone),
                "adopted": len(found.adopt),
            }
            return outcome
        await self._apply(found, listed, listed_at, outcome)
        return outcome

    async def _apply(
        self, found: Plan, listed: list[SandboxView], listed_at: datetime, outcome: Outcome
    ) -> None:
        timeout = self.settings.default_idle_timeout
        changes = {
            "resumed_outside": await self.store.resumed_outside(found.resumed_outside, listed_at, timeout),
            "paused_outside": await self.store.paused_outside(found.paused_outside, listed_at),
            "adopted": await self.store.adopt(found.adopt, timeout),
            "gone": await self._confirm_gone(found.maybe_gone, listed_at, outcome),
        }
        await self.store.record_sizes(listed, listed_at)
        for reason, count in changes.items():
            if count:
                metrics.RECONCILE_CHANGES.labels(reason).inc(count)
        outcome.changes = changes

    async def _confirm_gone(self, candidates: list[str], listed_at: datetime, outcome: Outcome) -> int:
        """KILLED only where get_info answers 404: one listing that missed a sandbox kills nothing."""
        gone = 0
        limit = self.settings.reconcile_gone_checks
        if len(candidates) > limit:
            log.warning(
                "more unlisted sandboxes than one run confirms; the rest next run",
                extra={"action": "reconcile.gone_capped", "candidates": len(candidates), "limit": limit},
            )
        for sandbox_id in candidates[:limit]:
            metrics.RATE_LIMIT_WAIT.observe(await self.bucket.take())
            outcome.requests += 1
            answer = await self.client.info(sandbox_id)
            if answer.outcome is CallOutcome.GONE and await self.store.mark_gone(sandbox_id, listed_at):
                gone += 1
        return gone


@contextlib.asynccontextmanager
async def _standalone(settings: Settings) -> AsyncIterator[Reconciler]:
    """A reconciler with its own store, client and rate-limiter share (the CLI's)."""
    from consumer.runner import e2b_access

    store = await Store.connect(settings.database_url.get_secret_value(), settings.database_schema, size=2)
    try:
        await store.migrate()
        client, bucket = e2b_access(settings, settings.e2b_api_url)
        yield Reconciler(settings, store, client, bucket, Health())
    finally:
        await store.close()


async def reconcile_once(settings: Settings, *, dry_run: bool) -> Outcome:
    """One reconcile now (``autopause reconcile --once``)."""
    async with _standalone(settings) as reconciler:
        return await reconciler.run(datetime.now(UTC), dry_run=dry_run)


async def reconcile_forever(settings: Settings) -> None:
    """Reconcile on the cron until SIGTERM or SIGINT (``autopause reconcile``)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with _standalone(settings) as reconciler:
        await reconciler.run_forever(stop)

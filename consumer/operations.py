"""What the commands other than the roles do: migrate, status, sessions, generate.

Each function opens what it needs from ``Settings``, does one job and returns
plain data; ``cli.py`` only parses arguments and prints. Dead letters are in
:mod:`consumer.dead_letters`.

Only ``migrate`` (and every role at start) changes the schema, and nothing here
declares the broker's topology: an operator's command against a database that
was never migrated says so instead of making the tables, and one against a
broker without the queues says which queue is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from consumer.broker import Broker, Names, connected, queue_limits, translated
from consumer.dead_letters import DeadLetterQueue, count_reasons
from consumer.e2b_adapter import CallOutcome, E2BClient
from consumer.errors import ConfigError, E2BError, NotFound
from consumer.migrate import bundled_migrations
from consumer.settings import Settings, env_name
from consumer.state import Reason, State
from consumer.store import Prices, SessionRecord, Store, TransitionRecord

_RUN_MIGRATE = "run `autopause migrate`"


async def migrate(settings: Settings) -> list[int]:
    """Apply the pending migrations; the versions applied (safe from several replicas at once)."""
    store = await Store.connect(settings.database_url.get_secret_value(), settings.database_schema, size=2)
    try:
        return await store.migrate()
    finally:
        await store.close()


@contextlib.asynccontextmanager
async def open_store(settings: Settings) -> AsyncIterator[Store]:
    """The store of a schema that is migrated; NotFound, naming the schema, when it is not."""
    store = await Store.connect(settings.database_url.get_secret_value(), settings.database_schema, size=2)
    try:
        applied = await store.applied_migrations()
        schema = settings.database_schema
        if applied is None:
            raise NotFound(f"the schema {schema} has no autopause tables; {_RUN_MIGRATE}")
        missing = sorted({m.version for m in bundled_migrations()} - set(applied))
        if missing:
            versions = ", ".join(map(str, missing))
            raise NotFound(f"the schema {schema} lacks migration {versions}; {_RUN_MIGRATE}")
        yield store
    finally:
        await store.close()


def prices(settings: Settings) -> Prices:
    """What a running sandbox costs by its size, from the settings (E2B's published prices)."""
    return Prices(
        settings.price_per_vcpu_second,
        settings.price_per_gib_second,
        settings.default_cpu_count,
        settings.default_memory_mb,
    )


def default_size_price(settings: Settings) -> float:
    """USD a running second of a sandbox of the default size costs."""
    return (
        settings.default_cpu_count * settings.price_per_vcpu_second
        + settings.default_memory_mb / 1024 * settings.price_per_gib_second
    )


async def status(settings: Settings) -> dict[str, Any]:
    """Sessions by state, queues, the last tick, recent pauses and the estimated savings.

    A queue that does not exist is reported as null, not as an error: status
    is what an operator runs first, also on a deployment half set up.
    """
    async with open_store(settings) as store:
        by_state = await store.count_by_state()
        tick = await store.last_tick()
        recent = await store.transitions_since(3600)
        paused_seconds, saved = await store.paused_usage(prices(settings))
    async with connected(settings, "cli") as opened:
        queues, dead = await _queues(opened)
    last_tick = None
    if tick is not None:
        last_tick = {
            "tick_at": tick.tick_at.isoformat(),
            "replica": tick.replica,
            "claimed": tick.claimed,
            "republished": tick.republished,
            "expired": tick.expired,
            "outcome": tick.outcome,
        }
    return {
        "sessions": {state.value: n for state, n in by_state.items()},
        "queues": queues,
        "last_tick": last_tick,
        "last_hour": {
            "paused": sum(n for (to, _), n in recent.items() if to is State.PAUSED),
            "resumed": sum(n for (_, reason), n in recent.items() if reason is Reason.RESUMED),
            "pause_failed": sum(n for (_, reason), n in recent.items() if reason is Reason.PAUSE_FAILED),
            "dry_run": sum(n for (_, reason), n in recent.items() if reason is Reason.DRY_RUN),
        },
        "dead_letters": dead,
        "paused_seconds": round(paused_seconds, 1),
        "savings_usd": round(saved, 4),
    }


async def _queues(
    opened: Broker,
) -> tuple[dict[str, dict[str, Any] | None], dict[str, dict[str, int] | None]]:
    """Each queue's depth, consumers and cap (full: it refuses publishes now), and dead letters by reason."""
    names = opened.names
    limits = queue_limits(opened.settings)
    queues: dict[str, dict[str, Any] | None] = {}
    for queue in (names.events_queue, names.pause_queue, names.events_dlq, names.pause_dlq):
        try:
            state = await opened.queue_state(queue)
        except NotFound:
            queues[queue] = None
            continue
        limit = limits.get(queue)
        queues[queue] = {
            "messages": state.ready,
            "consumers": state.consumers,
            "limit": limit,
            "full": limit is not None and state.ready >= limit,
        }
    dead: dict[str, dict[str, int] | None] = {}
    for which in DeadLetterQueue:
        queue = which.queue(names)
        dead[which.value] = await count_reasons(opened, queue) if queues[queue] is not None else None
    return queues, dead


async def list_sessions(
    settings: Settings,
    *,
    project: str | None,
    user: str | None,
    state: State | None,
    idle_longer_than: timedelta | None,
    limit: int,
) -> list[SessionRecord]:
    """Sessions matching every filter given, least recently active first."""
    async with open_store(settings) as store:
        return await store.list_sessions(
            project=project,
            user=user,
            state=state,
            idle_longer_than=idle_longer_than.total_seconds() if idle_longer_than else None,
            limit=limit,
        )


async def show_session(settings: Settings, sandbox_id: str) -> tuple[SessionRecord, list[TransitionRecord]]:
    """One session and its transitions, oldest first."""
    async with open_store(settings) as store:
        row = await store.get_session(sandbox_id)
        if row is None:
            raise NotFound(f"no session for sandbox {sandbox_id!r}")
        history = await store.transitions_of(sandbox_id)
    return row, history


async def pause_now(settings: Settings, sandbox_id: str) -> None:
    """Make a RUNNING sandbox due now: the next tick claims it, through the freshness gate."""
    async with open_store(settings) as store:
        state = await store.make_due(sandbox_id)
    if state is None:
        raise NotFound(f"no session for sandbox {sandbox_id!r}")
    if state is not State.RUNNING:
        raise ConfigError(f"sandbox {sandbox_id} is {state}: only a RUNNING sandbox can be paused")


async def keep_alive(settings: Settings, sandbox_id: str, duration: timedelta) -> tuple[State, datetime]:
    """Never pause ``sandbox_id`` before now + ``duration``; its state and that time."""
    until = datetime.now(UTC) + duration
    async with open_store(settings) as store:
        state = await store.keep_alive(sandbox_id, until)
    if state is None:
        raise NotFound(f"no session for sandbox {sandbox_id!r}")
    return state, until


@dataclass(frozen=True)
class Resumed:
    """An operator's resume: E2B runs the sandbox; where its row is now."""

    sandbox_id: str
    recorded: bool  # False: the row left PAUSED during the call, and stays where it went
    state: str
    pause_due_at: datetime | None
    lifetime_s: int


async def resume_session(settings: Settings, sandbox_id: str) -> Resumed:
    """Resume a PAUSED sandbox through E2B and record it: PAUSED -> RUNNING, with a fresh deadline.

    The row is read first and written by a compare-and-set on its state and
    generation, so a row that moved during the call (activity, a kill) is left
    where it went. When E2B no longer has the sandbox, the row becomes KILLED
    (``gone``) and the command fails.
    """
    key = settings.e2b_key
    if not key:
        raise ConfigError(
            f"sessions resume calls E2B: set {env_name('e2b_api_key')} (or E2B_API_KEY),"
            f" and {env_name('e2b_api_url')} unless it is E2B's own"
        )
    client = E2BClient(
        api_key=key, api_url=settings.e2b_api_url, request_timeout=settings.e2b_request_timeout
    )
    async with open_store(settings) as store:
        row = await store.get_session(sandbox_id)
        if row is None:
            raise NotFound(f"no session for sandbox {sandbox_id!r}")
        if row.state is not State.PAUSED:
            raise ConfigError(f"sandbox {sandbox_id} is {row.state}: only a PAUSED sandbox can be resumed")
        result = await client.resume(sandbox_id, settings.resume_timeout)
        if result.outcome is CallOutcome.GONE:
            gone = await store.gone_by_operator(sandbox_id, row.generation)
            where = "is now KILLED (gone)" if gone.moved else f"had moved to {gone.state} meanwhile"
            raise NotFound(f"E2B has no sandbox {sandbox_id} any more; its session {where}")
        if result.outcome is not CallOutcome.OK:
            retryable = result.outcome is CallOutcome.RETRYABLE
            hint = (
                "try again later"
                if retryable
                else f"check {env_name('e2b_api_key')} and {env_name('e2b_api_url')}"
            )
            raise E2BError(f"E2B did not resume {sandbox_id}: {result.error} ({hint})", retryable=retryable)
        done = await store.resume_by_operator(sandbox_id, row.generation, settings.default_idle_timeout)
    state = done.state.value if done.state else "unknown"
    return Resumed(sandbox_id, done.moved, state, done.pause_due_at, settings.resume_timeout)


async def generate(
    settings: Settings, *, users: int, duration: float, idle_share: float, idle_timeout: float
) -> int:
    """Publish simulated users' events until ``duration`` (0: a signal); the number published."""
    from consumer.traffic import Plan, Traffic

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if duration:
        loop.call_later(duration, stop.set)
    async with connected(settings, "generator") as opened:
        with translated("opening a channel to publish events"):
            channel = await opened.connection.channel(publisher_confirms=True)
            exchange = await channel.get_exchange(
                Names(settings.topology_prefix).events_exchange, ensure=False
            )
        traffic = Traffic(exchange, users, Plan(idle_timeout), idle_share=idle_share)
        await traffic.run(stop)
        return traffic.published

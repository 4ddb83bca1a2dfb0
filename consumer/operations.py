"""What the operator commands do: status, sessions, manual pause, keep-alive, dead letters.

Each function opens what it needs from ``Settings``, does one job and returns
plain data; ``cli.py`` only formats it.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel

from consumer import broker
from consumer.broker import Broker, translated
from consumer.errors import ConfigError, NotFound
from consumer.settings import Settings
from consumer.store import Prices, Store

# The most dead letters ``status`` reads to break them down by reason.
DEAD_LETTERS_READ = 1000


@contextlib.asynccontextmanager
async def open_store(settings: Settings) -> AsyncIterator[Store]:
    store = await Store.connect(settings.database_url.get_secret_value(), settings.database_schema, size=2)
    try:
        await store.migrate()
        yield store
    finally:
        await store.close()


@contextlib.asynccontextmanager
async def open_broker(settings: Settings) -> AsyncIterator[tuple[Broker, AbstractChannel]]:
    """The broker, with its topology declared, and a channel with confirms for reading dead letters."""
    opened = await Broker.connect(settings, "cli")
    try:
        if settings.declare_topology:
            await opened.declare_topology()
        with translated("opening a channel"):
            channel = await opened.connection.channel(publisher_confirms=True)
        yield opened, channel
    finally:
        await opened.close()


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
    """Sessions by state, queues, the last tick, recent pauses and the estimated savings."""
    names = broker.Names(settings.topology_prefix)
    async with open_store(settings) as store:
        by_state = await store.count_by_state()
        tick = await store.last_tick()
        recent = await store.transitions_since(3600)
        paused_seconds, saved = await store.paused_usage(prices(settings))
    queues: dict[str, dict[str, int]] = {}
    dead: dict[str, dict[str, int]] = {}
    async with open_broker(settings) as (opened, _):
        for queue in (names.events_queue, names.pause_queue, names.events_dlq, names.pause_dlq):
            state = await opened.queue_state(queue)
            queues[queue] = {"messages": state.ready, "consumers": state.consumers}
        for which in ("events", "pause"):
            dead[which] = await _reasons(opened, _dlq_name(settings, which))
    last_tick = None
    if tick is not None:
        last_tick = {
            "tick_at": tick["tick_at"].isoformat(),
            "replica": tick["replica"],
            "claimed": tick["claimed"],
            "republished": tick["republished"],
            "expired": tick["expired"],
            "outcome": tick["error"]
            or tick["skipped"]
            or ("running" if tick["finished_at"] is None else "ok"),
        }
    return {
        "sessions": by_state,
        "queues": queues,
        "last_tick": last_tick,
        "last_hour": {
            "paused": sum(n for (to, _), n in recent.items() if to == "PAUSED"),
            "resumed": sum(n for (to, reason), n in recent.items() if reason == "resumed"),
            "pause_failed": sum(n for (_, reason), n in recent.items() if reason == "pause_failed"),
            "dry_run": sum(n for (_, reason), n in recent.items() if reason == "dry_run"),
        },
        "dead_letters": dead,
        "paused_seconds": round(paused_seconds, 1),
        "savings_usd": round(saved, 4),
    }


async def list_sessions(
    settings: Settings,
    *,
    project: str | None,
    user: str | None,
    state: str | None,
    idle_longer_than: timedelta | None,
    limit: int,
) -> list[dict[str, Any]]:
    if state is not None and state.upper() not in {
        "RUNNING",
        "PAUSING",
        "PAUSED",
        "KILLED",
        "EXPIRED",
    }:
        raise ConfigError(f"unknown state {state!r}: use RUNNING, PAUSING, PAUSED, KILLED or EXPIRED")
    async with open_store(settings) as store:
        rows = await store.list_sessions(
            project=project,
            user=user,
            state=state.upper() if state else None,
            idle_longer_than=idle_longer_than.total_seconds() if idle_longer_than else None,
            limit=limit,
        )
    return [dict(row) for row in rows]


async def show_session(settings: Settings, sandbox_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    async with open_store(settings) as store:
        row = await store.get_session(sandbox_id)
        if row is None:
            raise NotFound(f"no session for sandbox {sandbox_id!r}")
        history = await store.transitions_of(sandbox_id)
    return dict(row), [dict(h) for h in history]


async def pause_now(settings: Settings, sandbox_id: str) -> None:
    """Make a RUNNING sandbox due now: the next tick claims it, through the freshness gate."""
    async with open_store(settings) as store:
        state = await store.make_due(sandbox_id)
    if state is None:
        raise NotFound(f"no session for sandbox {sandbox_id!r}")
    if state != "RUNNING":
        raise ConfigError(f"sandbox {sandbox_id} is {state}: only a RUNNING sandbox can be paused")


async def keep_alive(settings: Settings, sandbox_id: str, duration: timedelta) -> tuple[str, datetime]:
    until = datetime.now(UTC) + duration
    async with open_store(settings) as store:
        state = await store.keep_alive(sandbox_id, until)
    if state is None:
        raise NotFound(f"no session for sandbox {sandbox_id!r}")
    return state, until


@dataclass(frozen=True)
class DeadLetter:
    routing_key: str
    reason: str
    detail: str
    body: bytes


def _dlq_name(settings: Settings, which: str) -> str:
    names = broker.Names(settings.topology_prefix)
    if which not in ("events", "pause"):
        raise ConfigError("the dead-letter queue is 'events' or 'pause'")
    return names.events_dlq if which == "events" else names.pause_dlq


def dead_letter_reason(headers: dict[str, Any]) -> str:
    """Why a message was dead-lettered. Pure.

    autopause always sets its reason header on what it dead-letters itself; a
    dead letter without it was made by the broker, most often because the
    message came back more than ``x-delivery-limit`` times (a consumer that kept
    crashing on it): that is reported as "delivery limit".
    """
    reason = headers.get(broker.REASON_HEADER)
    if reason:
        return str(reason)
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        why = str(deaths[0].get("reason", ""))
        return "delivery limit" if why == "delivery_limit" else f"broker: {why}"
    return "unknown"


async def _reasons(opened: Broker, queue: str) -> dict[str, int]:
    """Dead letters of ``queue`` by reason, from the first DEAD_LETTERS_READ (left in place)."""
    counts: dict[str, int] = {}
    with translated(f"reading {queue}"):
        channel = await opened.connection.channel()
        try:
            source = await channel.get_queue(queue)
            for _ in range(DEAD_LETTERS_READ):
                msg = await source.get(fail=False)
                if msg is None:
                    break
                reason = dead_letter_reason(dict(msg.headers or {}))
                counts[reason] = counts.get(reason, 0) + 1
        finally:
            await channel.close()  # what was read goes back, unacked
    return counts


def _dead_letter(msg: aio_pika.abc.AbstractIncomingMessage) -> DeadLetter:
    headers = msg.headers or {}
    deaths = headers.get("x-death")
    original = str(headers.get(broker.ROUTING_KEY_HEADER, "") or "")
    reason = dead_letter_reason(dict(headers))
    if not original and isinstance(deaths, list) and deaths:
        first = deaths[0]
        if isinstance(first, dict):
            keys = first.get("routing-keys")
            original = str(keys[0]) if isinstance(keys, list) and keys else ""
    return DeadLetter(
        original or msg.routing_key or "",
        reason,
        str(headers.get(broker.DETAIL_HEADER, "") or ""),
        msg.body,
    )


async def dlq_list(settings: Settings, which: str, limit: int) -> list[DeadLetter]:
    """Read dead letters without removing them (they are requeued when the channel closes)."""
    queue_name = _dlq_name(settings, which)
    found: list[DeadLetter] = []
    async with open_broker(settings) as (opened, _):
        with translated(f"reading {queue_name}"):
            channel = await opened.connection.channel()
            queue = await channel.get_queue(queue_name)
            while len(found) < limit and (msg := await queue.get(fail=False)) is not None:
                found.append(_dead_letter(msg))
            await channel.close()
    return found


async def dlq_replay(settings: Settings, which: str, limit: int) -> int:
    """Publish dead letters back to their exchange (after a fix); each is removed once confirmed."""
    names = broker.Names(settings.topology_prefix)
    queue_name = _dlq_name(settings, which)
    target = names.events_exchange if which == "events" else names.commands_exchange
    replayed = 0
    async with open_broker(settings) as (_, channel):
        exchange = await channel.get_exchange(target)
        queue = await channel.get_queue(queue_name)
        while replayed < limit and (msg := await queue.get(fail=False)) is not None:
            letter = _dead_letter(msg)
            key = letter.routing_key or ("sandbox.pause" if which == "pause" else "sandbox.activity")
            await exchange.publish(broker.message(letter.body, message_id=msg.message_id), routing_key=key)
            await msg.ack()
            replayed += 1
    return replayed

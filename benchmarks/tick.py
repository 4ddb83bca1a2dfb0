"""The scheduler tick on a large table: one that claims every idle session, one that finds none.

The table holds ``tick_sessions`` rows, ``tick_idle`` of them RUNNING past
their deadline. The claim caps are raised so one tick takes them all; the
tick's time includes publishing the pause commands with confirms. The plans
of the claim and of the running count (EXPLAIN ANALYZE, in a transaction
rolled back) show which indexes they use.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import asyncpg

from benchmarks.common import Context, Figure, Timer, connected, depth, dsn, isolated
from benchmarks.data import seed_sessions
from consumer import broker
from consumer.broker import Names
from consumer.health import Health
from consumer.scheduler import Scheduler
from consumer.settings import Settings
from consumer.store import Store, queries

BENCH = "tick"


async def explain(conn: asyncpg.Connection, sql: str, *args: Any) -> str:
    """EXPLAIN (ANALYZE, BUFFERS) of a statement, whose effects are rolled back."""
    transaction = conn.transaction()
    await transaction.start()
    try:
        rows = await conn.fetch(f"EXPLAIN (ANALYZE, BUFFERS) {sql}", *args)
    finally:
        await transaction.rollback()
    return "\n".join(str(row[0]) for row in rows)


def execution_ms(plan: str) -> float | None:
    found = re.search(r"Execution Time: ([\d.]+) ms", plan)
    return float(found.group(1)) if found else None


def indexes_used(plan: str) -> list[str]:
    found = re.findall(
        r"(?:Index|Index Only) Scan (?:Backward )?using (\w+)|Bitmap Index Scan on (\w+)", plan
    )
    return sorted({name for pair in found for name in pair if name})


async def one_tick(settings: Settings, store: Store, conn: asyncpg.Connection) -> dict[str, Any]:
    """Run one tick through the scheduler role; its wall time and what it recorded."""
    opened = await broker.Broker.connect(settings, "bench-tick")
    try:
        scheduler = Scheduler(settings, store, opened, Health())
        timer = Timer()
        await scheduler.run(asyncio.Event(), once=True)
        seconds = timer.elapsed
    finally:
        await opened.close()
    row = await conn.fetchrow(
        """SELECT claimed, skipped, error, extract(epoch FROM finished_at - started_at) AS recorded
           FROM scheduler_ticks ORDER BY started_at DESC LIMIT 1"""
    )
    if row is None or row["error"] or row["skipped"]:
        raise RuntimeError(f"the tick did not run cleanly: {dict(row) if row else None}")
    return {"seconds": seconds, "claimed": row["claimed"], "recorded_s": float(row["recorded"])}


async def run(ctx: Context) -> list[Figure]:
    total, idle = ctx.sizes.tick_sessions, ctx.sizes.tick_idle
    overrides = {"claim_max_share": 1.0, "claim_hard_cap": max(idle, 1)}
    async with isolated(ctx.base, "tick", **overrides) as settings, connected(settings) as (conn, channel):
        seed_s = await seed_sessions(conn, total, idle=idle)
        ctx.say(f"   seeded {total:,} sessions ({idle:,} idle) in {seed_s:.1f} s")
        sql = queries()
        plans = {
            "claim_idle": await explain(conn, sql["claim_idle"], settings.claim_batch_size),
            "running_count": await explain(conn, sql["running_count"]),
        }
        for name, plan in plans.items():
            ctx.say(
                f"-- EXPLAIN (ANALYZE, BUFFERS) {name}:\n" + "\n".join("   " + s for s in plan.splitlines())
            )
        store = await Store.connect(dsn(settings), settings.database_schema, size=settings.db_pool_size)
        try:
            busy = await one_tick(settings, store, conn)
            queued, _ = await depth(channel, Names(settings.topology_prefix).pause_queue)
            if busy["claimed"] != idle or queued != idle:
                raise RuntimeError(f"claimed {busy['claimed']}, queued {queued}, of {idle} idle sessions")
            quiet = await one_tick(settings, store, conn)
        finally:
            await store.close()
    ctx.say(f"   tick claiming {idle:,}: {busy['seconds']:.2f} s; nothing idle: {quiet['seconds']:.3f} s")
    ctx.details[BENCH] = {"seed_s": seed_s, "busy": busy, "quiet": quiet, "plans": plans}
    batches = -(-idle // settings.claim_batch_size)
    claim_ms, count_ms = execution_ms(plans["claim_idle"]), execution_ms(plans["running_count"])
    return [
        Figure(
            BENCH,
            f"seed {total:,} sessions, {idle:,} idle",
            seed_s,
            "s",
            note="generate_series, indexes rebuilt, VACUUM ANALYZE included",
        ),
        Figure(
            BENCH,
            f"tick claiming {idle:,} idle (commands published)",
            busy["seconds"],
            "s",
            note=f"{idle / busy['seconds']:,.0f} claims/s; claim statements: {batches} of "
            f"{settings.claim_batch_size} rows, each followed by its confirmed publishes",
        ),
        Figure(
            BENCH,
            "tick with nothing idle",
            quiet["seconds"] * 1000,
            "ms",
            note=f"the tick's own record: {quiet['recorded_s'] * 1000:.1f} ms",
        ),
        Figure(
            BENCH,
            f"claim_idle, {settings.claim_batch_size} rows (EXPLAIN ANALYZE)",
            claim_ms,
            "ms",
            note="indexes: " + ", ".join(indexes_used(plans["claim_idle"])),
        ),
        Figure(
            BENCH,
            "running_count (EXPLAIN ANALYZE)",
            count_ms,
            "ms",
            note="indexes: " + (", ".join(indexes_used(plans["running_count"])) or "none"),
        ),
    ]

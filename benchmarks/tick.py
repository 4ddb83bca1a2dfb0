"""The scheduler tick on a large table: one that claims every idle session, then many that find none.

The table holds ``tick_sessions`` rows, ``tick_idle`` of them RUNNING past
their deadline, and an ingest replica runs (no tick claims without one). The
claim caps are raised so one tick takes them all; its time includes publishing
the pause commands with confirms, beside the same number of confirmed
publishes alone. Then ``QUIET_TICKS`` ticks find nothing due: their median
wall and CPU time, and the CPU share of the default cron (every 5 s, the
minutely sweeps included). The plans (EXPLAIN ANALYZE, rolled back) show which
indexes the statements use.
"""

from __future__ import annotations

import dataclasses
import re
import statistics
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from aio_pika.abc import AbstractChannel

from benchmarks.common import (
    Context,
    Figure,
    Timer,
    at_least,
    at_most,
    connected,
    depth,
    dsn,
    isolated,
    wait_for,
)
from benchmarks.data import messages, publish_pipelined, seed_sessions
from benchmarks.ingest import ingest_command
from benchmarks.pipeline import ingest_vouches
from benchmarks.processes import child_env
from consumer import broker
from consumer.broker import Names
from consumer.health import Health
from consumer.scheduler import Scheduler, TickResult
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


async def publish_rate(channel: AbstractChannel, settings: Settings, count: int) -> float:
    """Messages/s of ``count`` command-sized messages, confirmed and pipelined, to a scratch queue."""
    queue = await channel.declare_queue(exclusive=True)
    body = b'{"command_id":"00000000-0000-0000-0000-000000000000","sandbox_id":"x","generation":1}'
    first, last = await publish_pipelined(
        channel.default_exchange, messages((queue.name, body) for _ in range(count))
    )
    await queue.delete(if_unused=False, if_empty=False)
    return count / (last - first)


async def run(ctx: Context) -> list[Figure]:
    total, idle = ctx.sizes.tick_sessions, ctx.sizes.tick_idle
    overrides = {"claim_max_share": 1.0, "claim_hard_cap": max(idle, 1)}
    async with isolated(ctx.base, "tick", **overrides) as settings, connected(settings) as (conn, channel):
        seed_s = await seed_sessions(conn, total, idle=idle)
        ctx.say(f"   seeded {total:,} sessions ({idle:,} idle) in {seed_s:.1f} s")
        sql = queries()
        now = await conn.fetchval("SELECT now()")
        plans = {
            "probe": await explain(
                conn, sql["renew_leases_and_probe"], settings.pause_lease, settings.claim_batch_size
            ),
            "claim_idle": await explain(conn, sql["claim_idle"], settings.claim_batch_size, now),
            "running_count": await explain(conn, sql["running_count"]),
        }
        for name, plan in plans.items():
            ctx.say(
                f"-- EXPLAIN (ANALYZE, BUFFERS) {name}:\n" + "\n".join("   " + s for s in plan.splitlines())
            )
        # a live ingest replica: without one vouching for idleness, no tick claims
        ingest = ctx.procs.start("ingest", ingest_command(), child_env(settings))
        store = await Store.connect(dsn(settings), settings.database_schema, size=settings.db_pool_size)
        opened = await broker.Broker.connect(settings, "bench-tick")
        try:
            await wait_for(lambda: ingest_vouches(conn), timeout=60, what="ingest caught up", interval=0.1)
            scheduler = Scheduler(settings, store, opened, Health())
            scheduler.commands = await opened.publisher(opened.names.commands_exchange, confirm=True)
            publish = await publish_rate(channel, settings, idle)
            busy = await timed_tick(scheduler, datetime.now(UTC))
            queued, _ = await depth(channel, Names(settings.topology_prefix).pause_queue)
            if busy.claimed != idle or queued != idle:
                raise RuntimeError(f"claimed {busy.claimed}, queued {queued}, of {idle} idle sessions")
            quiet = await quiet_ticks(scheduler, QUIET_TICKS)
        finally:
            await opened.close()
            await store.close()
            await ctx.procs.stop(ingest)
    seconds = busy.detail["seconds"]
    claims = idle / seconds
    ctx.say(
        f"   tick claiming {idle:,}: {seconds:.2f} s ({claims:,.0f}/s, publishing alone {publish:,.0f}/s);"
        f" nothing due: median {quiet['median_ms']:.2f} ms of {QUIET_TICKS}"
    )
    ctx.details[BENCH] = {"seed_s": seed_s, "busy_s": seconds, "quiet": quiet, "plans": plans}
    ratio = claims / publish
    # the default cron ticks every 5 s; the sweeps run once a minute
    share = (12 * quiet["median_cpu_ms"] + quiet["maintenance_cpu_ms"]) / 60_000
    batches = -(-idle // settings.claim_batch_size)
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
            seconds,
            "s",
            note=f"{claims:,.0f} claims/s; {batches} claim statements of {settings.claim_batch_size} rows,"
            " each followed by its confirmed publishes",
        ),
        Figure(BENCH, "publish with confirms, pipelined (same run)", publish, "msg/s"),
        Figure(
            BENCH, f"claims / confirmed publishes, {idle:,}-claim tick", ratio, "ratio", *at_least(ratio, 0.9)
        ),
        Figure(
            BENCH,
            f"tick with nothing due, {total:,} sessions",
            quiet["median_ms"],
            "ms",
            *at_most(quiet["median_ms"], 2.0),
            note=f"median of {QUIET_TICKS} ticks; p90 {quiet['p90_ms']:.2f} ms;"
            f" CPU {quiet['median_cpu_ms']:.2f} ms; the minutely sweeps {quiet['maintenance_ms']:.0f} ms",
        ),
        Figure(
            BENCH,
            "tick CPU at the default cron (every 5 s)",
            share * 100,
            "% of a core",
            *at_most(share * 100, 1.0),
            note="12 ticks a minute, one with the sweeps",
        ),
        Figure(
            BENCH,
            "renew_leases_and_probe (EXPLAIN ANALYZE)",
            execution_ms(plans["probe"]),
            "ms",
            note="indexes: " + ", ".join(indexes_used(plans["probe"])),
        ),
        Figure(
            BENCH,
            f"claim_idle, {settings.claim_batch_size} rows (EXPLAIN ANALYZE)",
            execution_ms(plans["claim_idle"]),
            "ms",
            note="indexes: " + ", ".join(indexes_used(plans["claim_idle"])),
        ),
        Figure(
            BENCH,
            "running_count (EXPLAIN ANALYZE, only when something is due)",
            execution_ms(plans["running_count"]),
            "ms",
            note="indexes: " + (", ".join(indexes_used(plans["running_count"])) or "none"),
        ),
    ]


QUIET_TICKS = 100


async def timed_tick(scheduler: Scheduler, tick_at: datetime) -> TickResult:
    timer = Timer()
    result = await scheduler.tick(tick_at)
    if result.error or result.skipped:
        raise RuntimeError(f"the tick did not run cleanly: {result}")
    return dataclasses.replace(result, detail={**result.detail, "seconds": timer.elapsed})


async def quiet_ticks(scheduler: Scheduler, count: int) -> dict[str, float]:
    """``count`` ticks with nothing due (distinct fire times), after one with the minutely sweeps."""
    base = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=1)
    scheduler.maintained_at = float("-inf")
    cpu, timer = time.process_time(), Timer()
    await scheduler.tick(base)
    maintenance = (timer.elapsed * 1000, (time.process_time() - cpu) * 1000)
    walls, cpus = [], []
    for i in range(1, count + 1):
        cpu, timer = time.process_time(), Timer()
        result = await scheduler.tick(base + timedelta(seconds=5 * i))
        walls.append(timer.elapsed * 1000)
        cpus.append((time.process_time() - cpu) * 1000)
        if result.error or result.claimed:
            raise RuntimeError(f"a quiet tick did something: {result}")
    walls.sort()
    return {
        "median_ms": statistics.median(walls),
        "p90_ms": walls[int(len(walls) * 0.9)],
        "median_cpu_ms": statistics.median(cpus),
        "maintenance_ms": maintenance[0],
        "maintenance_cpu_ms": maintenance[1],
    }

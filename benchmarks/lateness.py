"""Lateness: seconds from a sandbox's idle deadline to PAUSED, through the whole pipeline.

``autopause run all`` with the built-in emulator, at default settings except a
short idle timeout; the tick keeps its default cron (every minute). Sandboxes
get their last activity such that their deadlines spread over the next
``lateness_spread`` seconds. They belong to a larger fleet (``lateness_fleet``
seeded sessions, a fifth of them RUNNING with distant deadlines): at default
settings the storm breaker lets one tick claim at most a tenth of the running
fleet, and 200 sandboxes that were the whole fleet, half of them falling due
each minute, would be held back by it, which is the breaker working, not
lateness. A tick claims what fell due since the last one,
so with a tick every P seconds the wait for the tick is uniform over 0..P:
p50 about P/2, p99 about 0.99 P. The rest is the pipeline (claimed_at ->
paused_at): the command through RabbitMQ, the worker, the E2B call.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from benchmarks.common import Context, Figure, connected, consuming, isolated, wait_for
from benchmarks.data import body, messages, publish_pipelined, seed_sessions
from benchmarks.processes import child_env, python
from consumer.broker import Names
from consumer.scheduler import claim_budget
from consumer.timing import next_ticks

BENCH = "lateness"


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks (q in 0..1)."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def tick_period(spec: str) -> float:
    first, second = next_ticks(spec, datetime.now(UTC), 2)
    return (second - first).total_seconds()


RUNNING = "SELECT count(*) FROM sandbox_sessions WHERE state = 'RUNNING'"
PAUSED = "SELECT count(*) FROM sandbox_sessions WHERE state = 'PAUSED' AND sandbox_id LIKE 'late-%'"
SPANS = """
SELECT extract(epoch FROM paused_at - pause_due_at)::float8 AS late,
       extract(epoch FROM claimed_at - pause_due_at)::float8 AS waited,
       extract(epoch FROM paused_at - claimed_at)::float8 AS pipeline
FROM sandbox_sessions WHERE sandbox_id LIKE 'late-%'
"""


def deadlines(n: int, timeout: float, spread: float, lead: float) -> list[tuple[str, bytes]]:
    """A created and an activity event per sandbox, timed so the deadlines spread over ``spread`` s."""
    now = datetime.now(UTC)
    items = []
    for i in range(n):
        deadline = now + timedelta(seconds=lead + spread * i / max(1, n - 1))
        last = deadline - timedelta(seconds=timeout)
        sid = f"late-{uuid.uuid4().hex[:10]}"
        items.append(("sandbox.created", body("created", sid, last - timedelta(seconds=1))))
        items.append(("sandbox.activity", body("activity", sid, last)))
    return items


def spread_of(values: list[float]) -> dict[str, float]:
    return {
        "p50": percentile(values, 0.5),
        "p99": percentile(values, 0.99),
        "min": min(values),
        "max": max(values),
    }


async def run(ctx: Context) -> list[Figure]:
    sizes = ctx.sizes
    n, timeout, spread, cron = (
        sizes.lateness_sandboxes,
        sizes.lateness_timeout,
        sizes.lateness_spread,
        sizes.lateness_cron,
    )
    if spread >= timeout:
        raise ValueError("lateness_spread must be below lateness_timeout (events cannot lie in the future)")
    period = tick_period(cron)
    lead = (timeout - spread) / 2
    ctx.say(f"   {n} sandboxes, idle timeout {timeout:g} s, deadlines over {spread:g} s, tick '{cron}'")
    overrides = {"default_idle_timeout": timeout, "tick_cron": cron}
    async with (
        isolated(ctx.base, "lateness", **overrides) as settings,
        connected(settings) as (conn, channel),
    ):
        names = Names(settings.topology_prefix)
        await seed_sessions(conn, sizes.lateness_fleet)
        running = int(await conn.fetchval(RUNNING)) + n
        share, cap, floor = settings.claim_max_share, settings.claim_hard_cap, settings.claim_min_per_tick
        budget = claim_budget(running, share, cap, floor)
        ctx.say(f"   fleet: {running:,} RUNNING; the storm breaker allows {budget:,} claims per tick")
        env = child_env(settings, emulator=True, default_idle_timeout=timeout, tick_cron=cron)
        proc = ctx.procs.start("run-all", python("-m", "consumer", "run", "all"), env)

        async def all_paused() -> bool:
            ctx.procs.check(proc)
            return bool(await conn.fetchval(PAUSED) == n)

        try:
            await consuming(channel, names.events_queue)
            await consuming(channel, names.pause_queue)
            exchange = await channel.get_exchange(names.events_exchange)
            await publish_pipelined(exchange, messages(deadlines(n, timeout, spread, lead)))
            patience = spread + lead + period + 90
            await wait_for(all_paused, timeout=patience, what="every sandbox PAUSED", interval=0.5)
        finally:
            await ctx.procs.stop(proc)
        rows = await conn.fetch(SPANS)
    result: dict[str, Any] = {
        "tick_period_s": period,
        "fleet_running": running,
        "claim_budget_per_tick": budget,
        "late": spread_of([r["late"] for r in rows]),
        "wait_for_tick": spread_of([r["waited"] for r in rows]),
        "pipeline": spread_of([r["pipeline"] for r in rows]),
    }
    ctx.details[BENCH] = result
    late, pipeline = result["late"], result["pipeline"]
    expect = f"tick every {period:g} s: the wait for it is uniform 0..{period:g} s"
    return [
        Figure(
            BENCH,
            "deadline -> PAUSED, p50",
            late["p50"],
            "s",
            note=f"{expect}, so p50 ~ {period / 2:g} s; {n} sandboxes, deadlines over {spread:g} s, "
            f"in a fleet of {running:,} running",
        ),
        Figure(
            BENCH,
            "deadline -> PAUSED, p99",
            late["p99"],
            "s",
            note=f"expected ~ {0.99 * period:.3g} s + pipeline; max {late['max']:.2f} s",
        ),
        Figure(
            BENCH,
            "claimed -> PAUSED (pipeline), p99",
            pipeline["p99"],
            "s",
            note=f"p50 {pipeline['p50']:.3f} s: command, worker, E2B call, row written",
        ),
    ]

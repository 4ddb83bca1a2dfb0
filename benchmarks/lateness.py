"""Lateness: seconds from a sandbox's idle deadline to PAUSED, through the whole pipeline, per tick cron.

Two deployments run side by side (:mod:`benchmarks.pipeline`: ingest,
scheduler and worker processes, the worker pausing through the e2b SDK
against the emulator), one ticking at the default cron (the default of
``AUTOPAUSE_TICK_CRON``, every 5 s) and one every second; every other setting
is the default except a short idle timeout.

Each deployment's table holds a fleet (``lateness_fleet`` seeded sessions, a
fifth of them RUNNING with distant deadlines, all of them known to the
emulator): at default settings the storm breaker lets one tick claim at most a
tenth of the running fleet, and a few hundred sandboxes that were the whole
fleet would be held back by it, which is the breaker working, not lateness.
``lateness_sandboxes`` sandboxes are then created by real ``sandbox.created``
events, published one by one over ``lateness_spread`` seconds; each deadline is
its event's arrival plus the idle timeout, so the deadlines spread evenly over
that span, whatever the phase of the tick.

Lateness is ``paused_at - pause_due_at`` of each row. With a tick every P
seconds the wait for the tick is uniform over 0..P. A tick also claims only
deadlines the ingest watermark covers: a deadline is claimable once a probe
sent after it has been committed, up to the ingest beat interval (1 s) and a
batch flush later. The target is p99 <= P + 1 s. ``claimed_at`` splits the rest off: the pipeline (command,
worker, E2B call, row written). "Passed over" counts the ticks that ran after
a deadline and did not claim it (the watermark had not reached it yet).
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

from benchmarks.common import Context, Figure, at_most, wait_for
from benchmarks.data import body, seed_sessions
from benchmarks.pipeline import Deployment, deployed, mirror_fleet, until_ticked
from consumer.scheduler import claim_budget
from consumer.settings import Settings
from consumer.timing import next_ticks

BENCH = "lateness"
EVERY_SECOND = "* * * * * *"


def default_cron() -> str:
    """The tick cron autopause ships with (not this environment's AUTOPAUSE_TICK_CRON)."""
    return str(Settings.model_fields["tick_cron"].default)


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


def spread_of(values: list[float]) -> dict[str, float]:
    return {
        "p50": percentile(values, 0.5),
        "p99": percentile(values, 0.99),
        "min": min(values),
        "max": max(values),
    }


RUNNING = "SELECT count(*) FROM sandbox_sessions WHERE state = 'RUNNING'"
PAUSED = "SELECT count(*) FROM sandbox_sessions WHERE state = 'PAUSED' AND sandbox_id LIKE 'late-%'"
SPANS = """
SELECT extract(epoch FROM s.paused_at - s.pause_due_at)::float8 AS late,
       extract(epoch FROM s.claimed_at - s.pause_due_at)::float8 AS waited,
       extract(epoch FROM s.paused_at - s.claimed_at)::float8 AS pipeline,
       (SELECT count(*) FROM scheduler_ticks AS t
        WHERE t.started_at >= s.pause_due_at AND t.finished_at < s.claimed_at) AS passed_over
FROM sandbox_sessions AS s WHERE s.sandbox_id LIKE 'late-%'
"""


async def create_spread(deployment: Deployment, n: int, spread: float) -> None:
    """Create ``n`` sandboxes in E2B and announce each by its event, evenly over ``spread`` seconds."""
    started = time.monotonic()
    for i in range(n):
        await asyncio.sleep(max(0.0, started + spread * i / max(1, n - 1) - time.monotonic()))
        sid = f"late-{i:05d}"
        deployment.emulator.add_sandbox(sid)
        await deployment.publish("sandbox.created", body("created", sid, datetime.now(UTC)))


async def measure(ctx: Context, label: str, cron: str) -> dict[str, Any]:
    """One deployment ticking at ``cron``: every sandbox's lateness, wait for the tick and pipeline."""
    sizes = ctx.sizes
    n, timeout, spread = sizes.lateness_sandboxes, sizes.lateness_timeout, sizes.lateness_spread
    period = tick_period(cron)

    async def prepare(conn: Any, emulator: Any) -> None:
        await seed_sessions(conn, sizes.lateness_fleet)
        await mirror_fleet(conn, emulator)

    async with deployed(ctx, label, prepare=prepare, tick_cron=cron, default_idle_timeout=timeout) as d:
        running = int(await d.conn.fetchval(RUNNING)) + n
        settings = d.settings
        budget = claim_budget(
            running, settings.claim_max_share, settings.claim_hard_cap, settings.claim_min_per_tick
        )
        await until_ticked(d, timeout=period + 30)
        await create_spread(d, n, spread)

        async def all_paused() -> bool:
            d.check()
            return bool(await d.conn.fetchval(PAUSED) == n)

        await wait_for(
            all_paused, timeout=timeout + period + 60, what=f"{label}: every sandbox PAUSED", interval=0.2
        )
        rows = await d.conn.fetch(SPANS)
    passed = [int(r["passed_over"]) for r in rows]
    return {
        "cron": cron,
        "tick_period_s": period,
        "fleet_running": running,
        "claim_budget_per_tick": budget,
        "late": spread_of([r["late"] for r in rows]),
        "wait_for_tick": spread_of([r["waited"] for r in rows]),
        "pipeline": spread_of([r["pipeline"] for r in rows]),
        "first_tick_share": sum(p == 0 for p in passed) / len(passed),
        "passed_over_max": max(passed),
    }


def figures(result: dict[str, Any], n: int, spread: float, beat: float) -> list[Figure]:
    period = result["tick_period_s"]
    default = " (default)" if result["cron"] == default_cron() else ""
    tick = f"tick every {period:g} s{default}"
    late, pipeline = result["late"], result["pipeline"]
    return [
        Figure(
            BENCH,
            f"deadline -> PAUSED p50, {tick}",
            late["p50"],
            "s",
            note=f"cron '{result['cron']}': the wait for the tick is uniform 0..{period:g} s"
            f" (p50 ~ {period / 2:g} s), the watermark up to the ingest beat ({beat:g} s) more;"
            f" {n} sandboxes, deadlines over {spread:g} s, in a fleet of {result['fleet_running']:,} running",
        ),
        Figure(
            BENCH,
            f"deadline -> PAUSED p99, {tick}",
            late["p99"],
            "s",
            *at_most(late["p99"], period + 1),
            note=f"target: tick interval + 1 s; max {late['max']:.2f} s;"
            f" {result['first_tick_share']:.0%} claimed by the first tick after their deadline,"
            f" the rest passed over by at most {result['passed_over_max']} tick(s) (watermark)",
        ),
        Figure(
            BENCH,
            f"claimed -> PAUSED (pipeline) p99, {tick}",
            pipeline["p99"],
            "s",
            note=f"p50 {pipeline['p50']:.3f} s: command, worker, E2B call, row written",
        ),
    ]


async def run(ctx: Context) -> list[Figure]:
    sizes = ctx.sizes
    crons = (default_cron(), EVERY_SECOND)
    ctx.say(
        f"   {sizes.lateness_sandboxes} sandboxes per deployment, idle timeout {sizes.lateness_timeout:g} s,"
        f" deadlines over {sizes.lateness_spread:g} s; ticks: " + ", ".join(f"'{c}'" for c in crons)
    )
    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(measure(ctx, f"lateness{i}", cron)) for i, cron in enumerate(crons)]
    results = [task.result() for task in tasks]
    ctx.details[BENCH] = results
    out: list[Figure] = []
    for result in results:
        late = result["late"]
        ctx.say(
            f"   '{result['cron']}': p50 {late['p50']:.2f} s, p99 {late['p99']:.2f} s;"
            f" budget {result['claim_budget_per_tick']:,} claims per tick"
        )
        out += figures(result, sizes.lateness_sandboxes, sizes.lateness_spread, ctx.base.ingest_beat_interval)
    return out

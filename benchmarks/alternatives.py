"""Against what users would pick instead: one traffic trace through autopause, beside the alternatives.

The trace (:mod:`benchmarks.trace`): ``alternatives_sandboxes`` users of the
demo's traffic model over ``alternatives_minutes`` minutes, shaped for the
idle timeout autopause ships with (600 s), from a fixed seed. It is replayed
``alternatives_compression`` times faster than it happened (an hour in three
minutes at 20) through three deployments at once (:mod:`benchmarks.pipeline`:
real ingest, scheduler and worker processes, the worker pausing through the
e2b SDK against the emulator), which differ only in their tick:

* the default tick, every 5 s; compressed, that is finer than cron's finest
  (1 s), so this run ticks every second: compression seconds of trace time,
  and its figures are an upper bound of the default's;
* a 1-minute tick and a 5-minute cron (``*/5 * * * *``), compressed to every
  60 / compression and 300 / compression seconds.

Every setting that times a pause is compressed alike: the idle timeout,
reconcile's cron (every minute), ingest's heartbeat and flush interval, and
the worker's repair interval; the others keep their defaults. What cannot be
compressed (RabbitMQ, Postgres, the E2B call: tens of milliseconds) weighs
compression times more in trace time. The alternatives are computed from the
same trace by their rules (:mod:`benchmarks.policies`); autopause's figures
come from the runs. All figures are in trace time:

* E2B API requests per hour: for autopause, every call the emulator answered
  during the replay (pauses, get_info, CPU metrics, reconcile's listings,
  repairs); ``set_timeout``: one call per activity event, or debounced to one
  per sandbox per ``THROTTLE_S``; a fixed lifetime: none. An app's own
  ``connect()`` calls are the same under every policy and not counted.
* idle-billed sandbox-seconds past the deadline: running time after each
  sandbox's last use plus the idle timeout, until its next use or the end of
  the trace; for autopause from the pauses and resumes the emulator saw.
* pauses in use: autopause's from its transitions log (``paused_in_use``);
  the alternatives' by the rule of :func:`benchmarks.policies.in_use` (the
  details also judge autopause's pauses by that rule).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from benchmarks import policies, report
from benchmarks.common import Context, Figure, wait_for
from benchmarks.data import all_committed
from benchmarks.pipeline import Deployment, deployed
from benchmarks.trace import Replayed, Trace, generate, replay
from consumer.settings import Settings

BENCH = "alternatives"
THROTTLE_S = 30.0
LIFETIMES_S = (300.0, 900.0)
# (policy, tick interval in trace seconds); the default is the shipped AUTOPAUSE_TICK_CRON
TICKS = (
    ("autopause, default tick (5 s)", 5.0),
    ("autopause, 1-minute tick", 60.0),
    ("autopause, 5-minute cron", 300.0),
)


def default(name: str) -> Any:
    """The value autopause ships with for a setting (not this environment's)."""
    return Settings.model_fields[name].default


def compressed_cron(interval: float, compression: float) -> tuple[str, float]:
    """A cron firing every ``interval`` trace seconds at ``compression``, and its real interval in seconds.

    Cron's finest interval is one second; a finer one is rounded up to it.
    """
    real = interval / compression
    if real <= 1:
        return "* * * * * *", 1.0
    if abs(real - round(real)) > 1e-9 or 60 % round(real):
        raise ValueError(f"{interval:g} s compressed {compression:g} times is no whole divisor of a minute")
    return f"*/{round(real)} * * * * *", float(round(real))


TIMED = (
    "tick_cron",
    "default_idle_timeout",
    "reconcile_cron",
    "ingest_beat_interval",
    "flush_interval",
    "repair_interval",
)


def compressed(cron: str, compression: float, idle_timeout: float) -> dict[str, Any]:
    """Settings of one deployment: its tick, and every pause-timing setting compressed."""
    return {
        "tick_cron": cron,
        "default_idle_timeout": idle_timeout / compression,
        "reconcile_cron": compressed_cron(60.0, compression)[0],
        "ingest_beat_interval": default("ingest_beat_interval") / compression,
        "flush_interval": default("flush_interval") / compression,
        "repair_interval": default("repair_interval") / compression,
    }


@dataclass
class Row:
    """One policy's figures over the trace."""

    policy: str
    run: str  # how the figures were had
    requests_per_hour: float
    idle_billed_s: float
    pauses: int
    in_use: int
    note: str = ""
    in_use_how: str = "by rule"


def judge(trace: Trace, running: dict[str, list[policies.Interval]]) -> tuple[float, int, int]:
    """(idle-billed seconds, pauses, pauses in use by the rule) of running intervals per sandbox."""
    billed, paused, used = 0.0, 0, 0
    timeout, end = trace.idle_timeout, trace.seconds
    for sid, intervals in running.items():
        uses = trace.times(sid)
        within = policies.clipped(intervals, end)
        billed += policies.idle_billed(uses, within, timeout, end)
        stops = policies.pauses(within, end)
        paused += len(stops)
        used += policies.in_use(uses, stops, timeout)
    return billed, paused, used


def alternatives(trace: Trace) -> list[Row]:
    """The alternatives' rows, by their rules."""
    hours = trace.seconds / 3600
    timeout, end = trace.idle_timeout, trace.seconds
    rows = []
    each = {sid: policies.each_activity(trace.times(sid), timeout) for sid in trace.uses}
    billed, paused, used = judge(trace, {sid: r for sid, (r, _) in each.items()})
    calls = sum(n for _, n in each.values())
    rows.append(Row("set_timeout on every activity", "trace, by rule", calls / hours, billed, paused, used))
    debounced = {sid: policies.throttled(trace.times(sid), timeout, THROTTLE_S, end) for sid in trace.uses}
    billed, paused, used = judge(trace, {sid: r for sid, (r, _) in debounced.items()})
    calls = sum(n for _, n in debounced.values())
    rows.append(
        Row(
            f"set_timeout, at most 1 per {THROTTLE_S:g} s per sandbox",
            "trace, by rule",
            calls / hours,
            billed,
            paused,
            used,
        )
    )
    for lifetime in LIFETIMES_S:
        fixed = {sid: policies.fixed_lifetime(trace.times(sid), lifetime) for sid in trace.uses}
        billed, paused, used = judge(trace, fixed)
        policy = f"on_timeout pause, fixed {lifetime / 60:g}-minute lifetime"
        rows.append(Row(policy, "trace, by rule", 0.0, billed, paused, used))
    return rows


async def measured(
    policy: str, run: str, trace: Trace, replayed: Replayed, index: int, deployment: Deployment
) -> tuple[Row, dict[str, Any]]:
    """Autopause's row from one deployment's run: the emulator's calls and the transitions log."""
    end = replayed.started + trace.seconds / replayed.compression
    calls = [c for c in deployment.emulator.calls() if replayed.started <= c.at <= end]
    changes: dict[str, list[tuple[float, bool]]] = {sid: [] for sid in trace.uses}
    for call in calls:
        if call.sandbox_id in changes and call.status in (201, 204):
            if call.op == "pause":
                changes[call.sandbox_id].append((replayed.trace_time(call.at), False))
            elif call.op in ("connect", "resume"):
                changes[call.sandbox_id].append((replayed.trace_time(call.at), True))
    for sid, at in replayed.resumes[index]:
        changes[sid].append((replayed.trace_time(at), True))
    running = {sid: policies.from_calls(uses[0].at, changes[sid]) for sid, uses in trace.uses.items()}
    billed, paused, by_rule = judge(trace, running)
    in_use = await deployment.transitions("paused_in_use")
    ops = Counter(c.op for c in calls)
    ticks: dict[str, int] = dict(
        await deployment.conn.fetchrow(
            """SELECT count(*) AS ticks, coalesce(max(claimed), 0) AS most,
                  count(*) FILTER (WHERE skipped IS NOT NULL OR error IS NOT NULL) AS idle
           FROM scheduler_ticks"""
        )
        or {}
    )
    detail = {
        "policy": policy,
        "settings": {name: getattr(deployment.settings, name) for name in TIMED},
        "calls_by_op": dict(ops),
        "app_resumes": len(replayed.resumes[index]),
        "paused_in_use_transitions": in_use,
        "pauses_in_use_by_rule": by_rule,
        "ticks": ticks,
    }
    by_op = ", ".join(f"{op} {n}" for op, n in ops.most_common())
    note = (
        f"calls: {by_op}; {ticks.get('most', 0)} claims in the busiest tick"
        " (the storm breaker allows a tenth of the running fleet)"
    )
    how = f"paused_in_use transitions; {by_rule} by the rule"
    row = Row(policy, run, len(calls) / (trace.seconds / 3600), billed, paused, in_use, note, how)
    return row, detail


async def settle(trace: Trace, replayed: Replayed, deployment: Deployment) -> None:
    """Wait until the deployment has committed every sandbox's last event (none was lost)."""
    expected = {
        sid: datetime.fromtimestamp(replayed.wall + uses[-1].at / replayed.compression, UTC)
        for sid, uses in trace.uses.items()
    }

    async def landed() -> bool:
        deployment.check()
        return await all_committed(deployment.conn, expected) == len(expected)

    await wait_for(landed, timeout=60, what="every event committed", interval=0.2)


async def run(ctx: Context) -> list[Figure]:
    sizes = ctx.sizes
    compression = sizes.alternatives_compression
    trace = generate(
        sizes.alternatives_sandboxes,
        sizes.alternatives_minutes * 60,
        idle_timeout=default("default_idle_timeout"),
    )
    crons = [compressed_cron(interval, compression) for _, interval in TICKS]
    ctx.say(
        f"   {len(trace.uses)} sandboxes, {trace.activities:,} activity events"
        f" over {trace.seconds / 60:g} min,"
        f" replayed {compression:g}x faster ({trace.seconds / compression:.0f} s); idle timeout"
        f" {trace.idle_timeout:g} s -> {trace.idle_timeout / compression:g} s; ticks "
        + ", ".join(f"'{cron}'" for cron, _ in crons)
    )
    async with contextlib.AsyncExitStack() as stack:
        async with asyncio.TaskGroup() as group:
            starting = [
                group.create_task(
                    stack.enter_async_context(
                        deployed(ctx, f"alt{i}", **compressed(cron, compression, trace.idle_timeout))
                    )
                )
                for i, (cron, _) in enumerate(crons)
            ]
        deployments = [task.result() for task in starting]
        replayed = await replay(trace, compression, deployments)
        for deployment in deployments:
            await settle(trace, replayed, deployment)
        rows, details = [], []
        for i, ((policy, interval), (cron, real)) in enumerate(zip(TICKS, crons, strict=True)):
            how = f"real run, cron '{cron}' (every {real * compression:g} s of trace)"
            if real * compression > interval:
                policy += f", run every {real * compression:g} s"
            row, detail = await measured(policy, how, trace, replayed, i, deployments[i])
            rows.append(row)
            details.append(detail)
    rows += alternatives(trace)
    ctx.details[BENCH] = {
        "trace": {"sandboxes": len(trace.uses), "seconds": trace.seconds, "activities": trace.activities},
        "compression": compression,
        "replay_lag_max_s": replayed.lag_max_s,
        "runs": details,
        "rows": [row.__dict__ for row in rows],
    }
    ctx.tables.append((title(trace, compression, replayed), table(rows)))
    return figures(rows, trace, compression)


def title(trace: Trace, compression: float, replayed: Replayed) -> str:
    return (
        f"Alternatives, one trace: {len(trace.uses)} sandboxes, {trace.seconds / 60:g} min of traffic"
        f" (idle timeout {trace.idle_timeout:g} s), replayed {compression:g}x faster, publishing at most"
        f" {replayed.lag_max_s * compression:.1f} s (trace) behind; figures in trace time"
    )


def table(rows: list[Row]) -> str:
    lines = [["policy", "E2B requests / hour", "idle-billed past deadline", "pauses", "pauses in use", "how"]]
    for row in rows:
        lines.append(
            [
                row.policy,
                f"{row.requests_per_hour:,.0f}",
                f"{row.idle_billed_s:,.0f} sandbox-s",
                f"{row.pauses:,}",
                f"{row.in_use:,}",
                row.run,
            ]
        )
    return report.markdown(lines)


def figures(rows: list[Row], trace: Trace, compression: float) -> list[Figure]:
    span = f"{trace.seconds / 60:g}-min trace"
    out = []
    for row in rows:
        out += [
            Figure(
                BENCH, f"E2B requests/hour: {row.policy}", row.requests_per_hour, "requests", note=row.note
            ),
            Figure(
                BENCH,
                f"idle-billed past deadline: {row.policy}",
                row.idle_billed_s,
                "sandbox-s",
                note=f"{span}, {row.pauses:,} pauses; {row.run}",
            ),
            Figure(
                BENCH,
                f"pauses in use: {row.policy}",
                row.in_use,
                "pauses",
                note=f"of {row.pauses:,}; {row.in_use_how}",
            ),
        ]
    return out

"""Ground truth at fleet size: reconcile of a large fleet, and what the CPU check costs per pause.

Reconcile: the emulator holds ``reconcile_fleet`` sandboxes (a tenth of them
paused) with ``latency`` per call; the table knows half of them, some with a
state E2B contradicts, and has live rows for sandboxes E2B no longer has. One
reconcile runs in this process; the figures are its E2B requests and wall
time, beside the ideal: one list request per 100 sandboxes, back to back at
the emulator's latency, plus one get_info per vanished sandbox.

CPU check: ``pause_count`` claimed rows are paused by a worker in this process
at several concurrencies, with the check on; the figure is the metrics
requests the emulator answered per 1,000 pauses (one request serves up to 100
candidates that arrive within a short window).
"""

from __future__ import annotations

import asyncio
import math
import uuid
from datetime import UTC, datetime

import orjson
from pydantic import SecretStr

from benchmarks.common import Context, Figure, Timer, connected, isolated
from consumer import runner
from consumer.broker import PAUSE_ROUTING_KEY, Names, message
from consumer.reconcile import reconcile_once
from e2b_emulator import Emulator

BENCH = "ground truth"
KEY = "e2b_bench_key"
PAGE = 100


async def run(ctx: Context) -> list[Figure]:
    figures = await reconcile_fleet(ctx)
    for concurrency in ctx.sizes.concurrency:
        figures.append(await cpu_checks(ctx, concurrency))
    return figures


async def reconcile_fleet(ctx: Context) -> list[Figure]:
    n = ctx.sizes.reconcile_fleet
    latency = ctx.sizes.latency
    vanished = max(1, n // 100)
    async with Emulator(api_key=KEY) as emulator:
        for i in range(n):
            emulator.add_sandbox(f"fleet-{i:06d}", state="paused" if i % 10 == 0 else "running")
        overrides = {"e2b_api_url": emulator.url, "e2b_api_key": SecretStr(KEY), "reconcile_gone_checks": n}
        async with isolated(ctx.base, "reconcile", **overrides) as settings, connected(settings) as (conn, _):
            # the table knows every other sandbox, some with a state E2B contradicts
            known = [f"fleet-{i:06d}" for i in range(0, n, 2)]
            states = [_row_state(i) for i in range(0, n, 2)]
            gone = [f"vanished-{i:05d}" for i in range(vanished)]
            await conn.execute(
                """INSERT INTO sandbox_sessions (sandbox_id, state, last_activity, last_arrived_at,
                       pause_due_at, updated_at, created_at)
                   SELECT id, st, now() - interval '1 hour', now() - interval '1 hour',
                          now() + interval '1 hour', now() - interval '1 hour', now() - interval '2 hours'
                   FROM unnest($1::text[], $2::text[]) AS u(id, st)""",
                known + gone,
                states + ["RUNNING"] * len(gone),
            )
            emulator.faults.latency = latency
            emulator.reset_calls()
            timer = Timer()
            outcome = await reconcile_once(settings, dry_run=False)
            wall = timer.elapsed
            if outcome.error:
                raise RuntimeError(f"reconcile failed: {outcome.error}")
            lists, infos = len(emulator.calls("list")), len(emulator.calls("info"))
    ideal_requests = math.ceil(n / PAGE) + vanished
    ideal_wall = ideal_requests * latency
    ctx.details["reconcile"] = {"fleet": n, "changes": outcome.changes, "lists": lists, "infos": infos}
    note = f"{n:,} sandboxes, {latency * 1000:.0f} ms a call; changes {outcome.changes}"
    return [
        Figure(
            BENCH,
            "reconcile: E2B requests",
            lists + infos,
            "requests",
            f"= {ideal_requests} ideal",
            lists + infos == ideal_requests,
            f"{lists} list + {infos} get_info; {note}",
        ),
        Figure(
            BENCH,
            "reconcile: wall time",
            round(wall, 2),
            "s",
            f"ideal {ideal_wall:.1f} s",
            None,
            f"ideal/actual {ideal_wall / wall:.2f}",
        ),
    ]


def _row_state(i: int) -> str:
    """The table's state of the i-th sandbox (E2B pauses every 10th)."""
    if i % 40 == 0:
        return "RUNNING"  # E2B says paused: paused outside
    if i % 10 == 0:
        return "PAUSED"
    return "PAUSED" if i % 30 == 2 else "RUNNING"  # E2B says running: resumed outside


async def cpu_checks(ctx: Context, concurrency: int) -> Figure:
    """Metrics requests per 1,000 pauses at ``concurrency``, the check on (no sandbox busy)."""
    n = ctx.sizes.pause_count
    async with Emulator(api_key=KEY) as emulator:
        overrides = {
            "e2b_api_url": emulator.url,
            "e2b_api_key": SecretStr(KEY),
            "worker_concurrency": concurrency,
        }
        async with (
            isolated(ctx.base, f"cpu_c{concurrency}", **overrides) as settings,
            connected(settings) as (
                conn,
                channel,
            ),
        ):
            ids = [f"cpu-{uuid.uuid4().hex[:6]}-{i:05d}" for i in range(n)]
            for sid in ids:
                emulator.add_sandbox(sid)
            await conn.execute(
                """INSERT INTO sandbox_sessions (sandbox_id, state, last_activity, last_arrived_at,
                       pause_due_at, generation, claimed_activity, claimed_at)
                   SELECT id, 'PAUSING', now() - interval '1 hour', now() - interval '1 hour', now(),
                          1, now() - interval '1 hour', now() FROM unnest($1::text[]) AS id""",
                ids,
            )
            exchange = await channel.get_exchange(Names(settings.topology_prefix).commands_exchange)
            now = datetime.now(UTC).isoformat()
            await asyncio.gather(
                *(
                    exchange.publish(
                        message(
                            orjson.dumps(
                                {
                                    "command_id": str(uuid.uuid4()),
                                    "sandbox_id": sid,
                                    "generation": 1,
                                    "issued_at": now,
                                }
                            )
                        ),
                        routing_key=PAUSE_ROUTING_KEY,
                    )
                    for sid in ids
                )
            )
            if await runner.run(settings, {"worker"}, burst=True, stop=asyncio.Event()) != 0:
                raise RuntimeError("the worker failed")
            paused = sum(emulator.state_of(sid) == "paused" for sid in ids)
            requests = len(emulator.calls("metrics"))
    per_thousand = requests / paused * 1000 if paused else float("nan")
    return Figure(
        BENCH,
        f"CPU check: metrics requests per 1,000 pauses, c={concurrency}",
        round(per_thousand, 1),
        "requests",
        "<= 10 at fleet scale",
        per_thousand <= 10,
        f"{requests} requests for {paused} pauses",
    )

"""A whole deployment for a benchmark: ingest, scheduler and worker, each in its own process.

The three roles run as ``python -m consumer run <role>``, on a fresh schema
and topology (:func:`benchmarks.common.isolated`), and the worker pauses
through the real e2b SDK against an E2B emulator served from this process, so
a benchmark can add sandboxes to it, resume them as an app's ``connect()``
would, and read its call log. :func:`deployed` returns once the deployment can
pause: consumers on both queues and an ingest replica that beats and has
committed a watermark (the scheduler's freshness gate claims nothing before).
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aio_pika
import asyncpg
from aio_pika.abc import AbstractExchange

from benchmarks.common import Context, amqp, connected, consuming, isolated, wait_for
from benchmarks.processes import child_env, python
from consumer.broker import Names, message
from consumer.settings import Settings
from e2b_emulator import Emulator

KEY = "e2b_bench_key"
ROLES = ("ingest", "scheduler", "worker")
# the gate's own default for a fresh heartbeat (AUTOPAUSE_INGEST_STALE_AFTER)
FRESH_BEAT_S = 5


@dataclass
class Deployment:
    """A running deployment: its settings, its emulator, its processes, and ways in."""

    settings: Settings
    emulator: Emulator
    conn: asyncpg.Connection  # on the deployment's schema
    events: AbstractExchange  # sandbox.events, on a channel without publisher confirms
    procs: dict[str, subprocess.Popen[bytes]]
    ctx: Context

    def check(self) -> None:
        """Raise if a role's process has died."""
        for proc in self.procs.values():
            self.ctx.procs.check(proc)

    async def publish(self, routing_key: str, body: bytes) -> None:
        await self.events.publish(message(body), routing_key=routing_key)

    async def transitions(self, reason: str) -> int:
        """How many transitions the log holds with ``reason``."""
        count = await self.conn.fetchval("SELECT count(*) FROM session_transitions WHERE reason = $1", reason)
        return int(count)


async def ingest_vouches(conn: asyncpg.Connection) -> bool:
    """An ingest replica beats and has committed a watermark: the gate lets ticks claim."""
    return bool(
        await conn.fetchval(
            "SELECT count(*) FROM ingest_replicas WHERE watermark IS NOT NULL"
            " AND beat_at > now() - make_interval(secs => $1)",
            FRESH_BEAT_S,
        )
    )


async def ticked(conn: asyncpg.Connection, since: datetime) -> bool:
    """The scheduler has recorded a tick that started after ``since``."""
    return bool(await conn.fetchval("SELECT count(*) FROM scheduler_ticks WHERE started_at > $1", since))


async def mirror_fleet(conn: asyncpg.Connection, emulator: Emulator) -> int:
    """Make E2B (the emulator) hold every live row of the table in its state; how many.

    Seeded rows E2B knew nothing of would send reconcile after each of them.
    """
    rows = await conn.fetch(
        "SELECT sandbox_id, state FROM sandbox_sessions WHERE state IN ('RUNNING', 'PAUSING', 'PAUSED')"
    )
    for row in rows:
        emulator.add_sandbox(row["sandbox_id"], state="paused" if row["state"] == "PAUSED" else "running")
    return len(rows)


@contextlib.asynccontextmanager
async def deployed(
    ctx: Context,
    label: str,
    *,
    prepare: Callable[[asyncpg.Connection, Emulator], Awaitable[object]] | None = None,
    **fields: Any,
) -> AsyncIterator[Deployment]:
    """Start the three roles with the settings ``fields`` (as in Settings) and wait until they can pause.

    ``prepare`` runs on the migrated schema and the emulator before any process
    starts (to seed rows, add sandboxes). Every process is stopped on the way out.
    """
    async with Emulator(api_key=KEY) as emulator:
        fields = {**fields, "e2b_api_url": emulator.url}
        async with (
            isolated(ctx.base, label, **fields) as settings,
            connected(settings) as (conn, channel),
            await aio_pika.connect(amqp(settings)) as publishing,
        ):
            if prepare is not None:
                await prepare(conn, emulator)
            env = child_env(settings, e2b_api_key=KEY, **fields)
            procs: dict[str, subprocess.Popen[bytes]] = {}
            try:
                for role in ROLES:
                    procs[role] = ctx.procs.start(
                        f"{label}-{role}", python("-m", "consumer", "run", role), env
                    )
                unconfirmed = await publishing.channel(publisher_confirms=False)
                names = Names(settings.topology_prefix)
                deployment = Deployment(
                    settings=settings,
                    emulator=emulator,
                    conn=conn,
                    events=await unconfirmed.get_exchange(names.events_exchange),
                    procs=procs,
                    ctx=ctx,
                )

                async def vouched() -> bool:
                    deployment.check()
                    return await ingest_vouches(conn)

                await consuming(channel, names.events_queue)
                await consuming(channel, names.pause_queue)
                await wait_for(vouched, timeout=60, what=f"{label}: an ingest watermark", interval=0.1)
                yield deployment
            finally:
                for proc in procs.values():
                    await ctx.procs.stop(proc)


async def until_ticked(deployment: Deployment, timeout: float) -> None:
    """Wait for the scheduler's next tick (it has started and its cron fires)."""
    since = await deployment.conn.fetchval("SELECT now()")

    async def seen() -> bool:
        deployment.check()
        return await ticked(deployment.conn, since)

    await wait_for(seen, timeout=timeout, what="a scheduler tick", interval=0.1)

"""Stop, start and restart the machine's real RabbitMQ and PostgreSQL, and wait until they serve again.

RabbitMQ is stopped with ``rabbitmqctl stop_app`` (the Erlang node keeps running,
so ``start_app`` brings the broker back in a few seconds with its durable
queues); if the node itself is gone, ``rabbitmq-server -detached`` starts it.
PostgreSQL is driven with ``pg_ctlcluster`` on the one cluster in /etc/postgresql.

Every start waits with a deadline for what a client needs: an AMQP connection
that opens a channel, a Postgres connection that answers ``SELECT 1``.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncpg

from .amqp import accepts_clients
from .config import AMQP_URL, DATABASE_URL
from .waiting import wait_for

START_TIMEOUT = 120.0


def _pg_cluster() -> tuple[str, str]:
    """(version, name) of the local cluster, e.g. ("15", "main")."""
    versions = sorted(Path("/etc/postgresql").iterdir(), key=lambda p: int(p.name))
    version = versions[-1]
    clusters = sorted(p.name for p in version.iterdir() if p.is_dir())
    return version.name, ("main" if "main" in clusters else clusters[0])


async def _sh(*args: str, timeout: float = START_TIMEOUT, check: bool = True) -> int:
    """Run a command in a thread, so the event loop (and what it serves) keeps going."""

    def run() -> int:
        done = subprocess.run(args, capture_output=True, timeout=timeout, check=False)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr.decode()[-500:]}")
        return done.returncode

    return await asyncio.to_thread(run)


# RabbitMQ ------------------------------------------------------------------


async def amqp_ready() -> bool:
    """True when a client can connect to the shared broker and open a channel."""
    return await accepts_clients(AMQP_URL)


async def _node_running() -> bool:
    return await _sh("rabbitmq-diagnostics", "-q", "ping", timeout=30, check=False) == 0


async def stop_rabbitmq() -> None:
    """Stop the broker application; every client connection is closed by the server."""
    await _sh("rabbitmqctl", "stop_app")


async def start_rabbitmq(timeout: float = START_TIMEOUT) -> None:
    """Start the broker (the node too, if it is down) and wait until a client can connect."""
    if not await _node_running():
        await _sh("rabbitmq-server", "-detached")
        await wait_for(_node_running, timeout=timeout, what="the RabbitMQ node")
    await _sh("rabbitmqctl", "start_app")
    await wait_for(amqp_ready, timeout=timeout, what="RabbitMQ to accept clients")


async def ensure_rabbitmq() -> None:
    """Bring RabbitMQ back if a test left it down."""
    if not await amqp_ready():
        await start_rabbitmq()


def rabbitmq_down() -> contextlib.AbstractAsyncContextManager[None]:
    """RabbitMQ is stopped inside the block and serving again after it, whatever happens."""
    return _down(stop_rabbitmq, start_rabbitmq)


# PostgreSQL ----------------------------------------------------------------


async def postgres_ready() -> bool:
    """True when a client can connect and run a query."""
    try:
        conn = await asyncpg.connect(DATABASE_URL, timeout=3)
    except Exception:
        return False
    try:
        return bool(await conn.fetchval("SELECT 1") == 1)
    except Exception:
        return False
    finally:
        with contextlib.suppress(Exception):
            await conn.close()


async def _pg_ctl(action: str, timeout: float = START_TIMEOUT, check: bool = True) -> None:
    """``pg_ctlcluster ACTION`` on the machine's cluster; after a start, wait until it serves."""
    version, name = _pg_cluster()
    await _sh("pg_ctlcluster", "--skip-systemctl-redirect", version, name, action, check=check)
    if action != "stop":
        await wait_for(postgres_ready, timeout=timeout, what="PostgreSQL to accept clients")


async def stop_postgres() -> None:
    """Stop the cluster (fast mode: open sessions are terminated)."""
    await _pg_ctl("stop")


async def start_postgres(timeout: float = START_TIMEOUT) -> None:
    await _pg_ctl("start", timeout)


async def restart_postgres(timeout: float = START_TIMEOUT) -> None:
    """Restart the cluster and wait until it answers again."""
    await _pg_ctl("restart", timeout)


async def ensure_postgres() -> None:
    """Bring PostgreSQL back if a test left it down."""
    if not await postgres_ready():
        await _pg_ctl("start", check=False)


def postgres_down() -> contextlib.AbstractAsyncContextManager[None]:
    """PostgreSQL is stopped inside the block and serving again after it, whatever happens."""
    return _down(stop_postgres, start_postgres)


@contextlib.asynccontextmanager
async def _down(
    stop: Callable[[], Awaitable[None]], start: Callable[[], Awaitable[None]]
) -> AsyncIterator[None]:
    await stop()
    try:
        yield
    finally:
        await start()

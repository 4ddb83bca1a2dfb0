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
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import asyncpg
from conftest import AMQP_URL, DATABASE_URL, wait_for

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
    """True when a client can connect and open a channel."""
    try:
        connection = await aio_pika.connect(AMQP_URL, timeout=3)
    except Exception:
        return False
    try:
        channel = await connection.channel()
        await channel.close()
        return True
    except Exception:
        return False
    finally:
        with contextlib.suppress(Exception):
            await connection.close()


async def _node_running() -> bool:
    return await _sh("rabbitmq-diagnostics", "-q", "ping", timeout=30, check=False) == 0


async def stop_rabbitmq() -> None:
    """Stop the broker application; every client connection is closed by the server."""
    await _sh("rabbitmqctl", "stop_app")


async def start_rabbitmq(timeout: float = START_TIMEOUT) -> None:
    """Start the broker (the node too, if it is down) and wait until a client can connect."""
    if not await _node_running():
        await _sh("rabbitmq-server", "-detached")
        await wait_for(_node_running_poll, timeout=timeout, what="the RabbitMQ node")
    await _sh("rabbitmqctl", "start_app")
    await wait_for(amqp_ready, timeout=timeout, what="RabbitMQ to accept clients")


async def _node_running_poll() -> bool:
    running = await _node_running()
    if not running:
        await asyncio.sleep(0.5)
    return running


async def ensure_rabbitmq() -> None:
    """Bring RabbitMQ back if a test left it down."""
    if not await amqp_ready():
        await start_rabbitmq()


@contextlib.asynccontextmanager
async def rabbitmq_down() -> AsyncIterator[None]:
    """RabbitMQ is stopped inside the block and serving again after it, whatever happens."""
    await stop_rabbitmq()
    try:
        yield
    finally:
        await start_rabbitmq()


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


async def _pg_ctl(action: str) -> None:
    version, name = _pg_cluster()
    await _sh("pg_ctlcluster", "--skip-systemctl-redirect", version, name, action)


async def stop_postgres() -> None:
    """Stop the cluster (fast mode: open sessions are terminated)."""
    await _pg_ctl("stop")


async def start_postgres(timeout: float = START_TIMEOUT) -> None:
    await _pg_ctl("start")
    await wait_for(postgres_ready, timeout=timeout, what="PostgreSQL to accept clients")


async def restart_postgres(timeout: float = START_TIMEOUT) -> None:
    """Restart the cluster and wait until it answers again."""
    await _pg_ctl("restart")
    await wait_for(postgres_ready, timeout=timeout, what="PostgreSQL to accept clients")


async def ensure_postgres() -> None:
    """Bring PostgreSQL back if a test left it down."""
    if not await postgres_ready():
        version, name = _pg_cluster()
        await _sh("pg_ctlcluster", "--skip-systemctl-redirect", version, name, "start", check=False)
        await wait_for(postgres_ready, timeout=START_TIMEOUT, what="PostgreSQL to accept clients")


@contextlib.asynccontextmanager
async def postgres_down() -> AsyncIterator[None]:
    """PostgreSQL is stopped inside the block and serving again after it, whatever happens."""
    await stop_postgres()
    try:
        yield
    finally:
        await start_postgres()


# a link whose close lags -------------------------------------------------------


class LaggingLink:
    """A loopback TCP proxy that passes bytes at once but a server's close only after ``lag`` seconds.

    Between the last bytes of a server (say PostgreSQL's "terminating connection"
    notice) and the end of the connection there is then a window that a client
    can be caught in, every time instead of now and then.
    """

    def __init__(self, target_host: str, target_port: int, lag: float) -> None:
        self.target = (target_host, target_port)
        self.lag = lag
        self.server: asyncio.Server | None = None
        self.port = 0
        self.upstream_ports: set[int] = set()  # local ports of our connections to the server
        self.tasks: set[asyncio.Task[None]] = set()
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._link, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        """Stop listening and close every link at once, both ends (no lag)."""
        if self.server is not None:
            self.server.close()
            self.server = None
        for writer in list(self.writers):
            writer.transport.abort()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            self.tasks.discard(task)
            return
        self.upstream_ports.add(up_writer.get_extra_info("sockname")[1])
        self.writers.update({writer, up_writer})

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, lag: float) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            await asyncio.sleep(lag)
            dst.close()

        try:
            await asyncio.gather(pipe(reader, up_writer, 0), pipe(up_reader, writer, self.lag))
        finally:
            self.tasks.discard(task)
            self.writers.difference_update({writer, up_writer})

"""Fixtures on the real services: each test gets its own Postgres schema and broker names."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import orjson
import pytest
from pydantic import SecretStr

from consumer.broker import Names, declare_topology, delete_topology, message, publish_all
from consumer.settings import Settings, load_settings
from consumer.store import Store
from e2b_emulator import Emulator

ROOT = Path(__file__).resolve().parent.parent
AMQP_URL = os.environ.get("AUTOPAUSE_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
DATABASE_URL = os.environ.get("AUTOPAUSE_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")


async def wait_for(
    condition: Callable[[], Awaitable[Any]], timeout: float = 30, what: str = "condition"
) -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = await condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {value!r})")
        await asyncio.sleep(0.05)


def isolated_env(settings: Settings, **extra: str) -> dict[str, str]:
    """Environment for a subprocess that uses the same schema and broker names."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTOPAUSE_") and k != "E2B_API_KEY"}
    env.update(
        AUTOPAUSE_AMQP_URL=AMQP_URL,
        AUTOPAUSE_DATABASE_URL=DATABASE_URL,
        AUTOPAUSE_DATABASE_SCHEMA=settings.database_schema,
        AUTOPAUSE_TOPOLOGY_PREFIX=settings.topology_prefix,
        AUTOPAUSE_METRICS_PORT="0",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def free_port() -> int:
    """A loopback port nothing listens on (until someone binds it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def autopause(*args: str) -> list[str]:
    return [sys.executable, "-m", "consumer", *args]


async def cli(settings: Settings, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``autopause ARGS`` as a subprocess on ``settings``' schema and broker names, to its end."""
    return await asyncio.to_thread(
        subprocess.run,
        autopause(*args),
        env=isolated_env(settings, **env),
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def names_seed() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture
async def settings(names_seed: str) -> AsyncIterator[Settings]:
    """Settings with a private schema and topology; both are removed afterwards."""
    made = load_settings(
        amqp_url=AMQP_URL,
        database_url=DATABASE_URL,
        database_schema=f"t_{names_seed}",
        topology_prefix=f"t{names_seed}.",
        metrics_port=0,
        flush_interval=0.05,
        default_idle_timeout=600,
    )
    yield made
    conn = await asyncpg.connect(DATABASE_URL)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{made.database_schema}" CASCADE')
    finally:
        await conn.close()
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        await delete_topology(await connection.channel(), made.topology_prefix)


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[Store]:
    made = await Store.connect(settings.database_url.get_secret_value(), settings.database_schema)
    await made.migrate()
    yield made
    await made.close()


@pytest.fixture
async def channel(settings: Settings) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        ch = await connection.channel(publisher_confirms=True)
        await declare_topology(ch, settings)
        yield ch


def now() -> datetime:
    return datetime.now(UTC)


def event(kind: str, sandbox_id: str, *, at: datetime | None = None, **fields: Any) -> dict[str, Any]:
    """A valid event as a producer would send it."""
    body: dict[str, Any] = {
        "event_id": str(uuid.uuid4()),
        "type": f"sandbox.{kind}",
        "occurred_at": (at or now()).isoformat(),
        "sandbox_id": sandbox_id,
    }
    if kind == "created":
        body.update(project_id="proj-1", user_id="user-1", template="base")
    elif kind == "activity":
        body.update(source="terminal")
    body.update(fields)
    return body


async def publish_confirmed(
    exchange: aio_pika.abc.AbstractExchange, items: Iterable[tuple[str, aio_pika.Message]]
) -> None:
    """Publish with confirms, as an at-least-once producer does: raise unless every message was taken."""
    confirmed = await publish_all(exchange, items)
    if not all(confirmed):
        raise aio_pika.exceptions.DeliveryError(None, None)  # type: ignore[arg-type]


async def publish(
    channel: aio_pika.abc.AbstractChannel,
    settings: Settings,
    bodies: list[dict[str, Any] | bytes],
    routing_key: str | None = None,
) -> None:
    """Publish events (dicts, or raw bytes for invalid ones) to sandbox.events with confirms."""
    exchange = await channel.get_exchange(Names(settings.topology_prefix).events_exchange)
    items = []
    for body in bodies:
        if isinstance(body, bytes):
            items.append((routing_key or "sandbox.activity", message(body)))
        else:
            items.append((routing_key or body.get("type", "sandbox.activity"), message(orjson.dumps(body))))
    await publish_confirmed(exchange, items)


async def queue_ready(channel: aio_pika.abc.AbstractChannel, name: str) -> int:
    queue = await channel.declare_queue(name, passive=True)
    return int(queue.declaration_result.message_count or 0)


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start autopause subprocesses, output to a log file each (``proc.log``), never an unread pipe.

    Any still running at the end are killed.
    """
    started: list[subprocess.Popen[bytes]] = []

    def start(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = tmp_path / f"process-{len(started)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        proc.log = log  # type: ignore[attr-defined]
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


E2B_KEY = "e2b_test_key_0123456789"


@pytest.fixture
async def emulator() -> AsyncIterator[Emulator]:
    """The E2B emulator, accepting only E2B_KEY."""
    async with Emulator(api_key=E2B_KEY, seed=1) as emu:
        yield emu


@pytest.fixture
def pause_settings(settings: Settings, emulator: Emulator) -> Settings:
    """Settings whose worker pauses through ``emulator``, with short retry delays."""
    return settings.model_copy(
        update={
            "e2b_api_url": emulator.url,
            "e2b_api_key": SecretStr(E2B_KEY),
            "retry_base_delay": 0.01,
            "retry_max_delay": 0.05,
            "e2b_request_timeout": 5.0,
            "claim_max_share": 1.0,
        }
    )


def ago(seconds: float) -> datetime:
    return now() - timedelta(seconds=seconds)


# helpers for the safety tests ------------------------------------------------------


def metric(name: str, **labels: str) -> float:
    """The current value of a metric of this process (0 when never set)."""
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels) or 0.0


async def _rabbitmqctl(*args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        "rabbitmqctl", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {err.decode()[-300:]}")
    return out.decode()


PROBE = b"refusing-queue probe"


async def _refuses_publishing(queue: str) -> bool:
    """Publish a probe to ``queue``; True when the broker refuses it (a nack)."""
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        try:
            await channel.default_exchange.publish(aio_pika.Message(PROBE), routing_key=queue)
        except aio_pika.exceptions.DeliveryError:
            return True
        return False


async def _drop_probes(queue: str) -> None:
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        source = await channel.get_queue(queue)
        while (msg := await source.get(fail=False)) is not None:
            if msg.body == PROBE:
                await msg.ack()
        # closing the channel returns every other message to the queue


@contextlib.asynccontextmanager
async def refusing_queue(queue: str) -> AsyncIterator[None]:
    """``queue`` refuses every publish (a nack, as a full queue does) inside the block.

    A policy with max-length 0 and reject-publish; a quorum queue refuses once
    it is over its limit, so a probe message fills it first. Policies apply
    asynchronously: the block starts once a publish is refused and ends once
    one is taken again; the probes are then removed.
    """
    name = "test-" + uuid.uuid4().hex[:8]
    pattern = "^" + re.escape(queue) + "$"
    definition = orjson.dumps({"max-length": 0, "overflow": "reject-publish"}).decode()
    await _rabbitmqctl("set_policy", name, pattern, definition, "--apply-to", "queues")
    try:
        await wait_for(lambda: _refuses_publishing(queue), timeout=30, what=f"{queue} refusing")
        yield
    finally:
        await _rabbitmqctl("clear_policy", name)

        async def taking() -> bool:
            return not await _refuses_publishing(queue)

        await wait_for(taking, timeout=30, what=f"{queue} taking messages again")
        await _drop_probes(queue)


@contextlib.asynccontextmanager
async def failing_writes(store: Store, sqlstate: str, table: str = "sandbox_sessions") -> AsyncIterator[None]:
    """Every INSERT or UPDATE of a row of ``table`` fails with ``sqlstate`` inside the block.

    A row trigger raises the error, so the client sees exactly what PostgreSQL
    sends for a read-only standby, a full disk or a cancelled statement, on the
    statements that write rows (one that changes no row goes through).
    """
    function = f"fail_{uuid.uuid4().hex[:8]}"
    async with store.pool.acquire() as conn:
        await conn.execute(
            f"CREATE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            f"RAISE EXCEPTION 'injected failure' USING ERRCODE = '{sqlstate}'; END $$"
        )
        await conn.execute(
            f"CREATE TRIGGER {function} BEFORE INSERT OR UPDATE ON {table} "
            f"FOR EACH ROW EXECUTE FUNCTION {function}()"
        )
    try:
        yield
    finally:
        async with store.pool.acquire() as conn:
            await conn.execute(f"DROP TRIGGER IF EXISTS {function} ON {table}")
            await conn.execute(f"DROP FUNCTION IF EXISTS {function}()")


@contextlib.asynccontextmanager
async def service(settings: Settings, roles: set[str]) -> AsyncIterator[asyncio.Task[int]]:
    """``roles`` running in this process inside the block; stopped as by SIGTERM afterwards."""
    from consumer import runner

    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(settings, roles, stop=stop), name="service-" + "+".join(roles))
    try:
        yield task
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, timeout=60)


@contextlib.asynccontextmanager
async def database(settings: Settings) -> AsyncIterator[asyncpg.Connection]:
    """A connection of its own to the test's schema."""
    conn = await asyncpg.connect(DATABASE_URL, server_settings={"search_path": settings.database_schema})
    try:
        yield conn
    finally:
        await conn.close()


async def ingest_caught_up(settings: Settings) -> bool:
    """An ingest replica beats and has committed a watermark: the scheduler may claim."""
    async with database(settings) as conn:
        n = await conn.fetchval(
            "SELECT count(*) FROM ingest_replicas"
            " WHERE watermark IS NOT NULL AND beat_at > now() - interval '5 seconds'"
        )
    return bool(n)


async def arrived_long_ago(settings: Settings) -> None:
    """Make every row's events look as old on arrival as their stamps say: idle rows become due."""
    async with database(settings) as conn:
        await conn.execute(
            "UPDATE sandbox_sessions SET last_arrived_at = last_activity,"
            " pause_due_at = last_activity + make_interval(secs => coalesce(idle_timeout_s, $1))"
            " WHERE state = 'RUNNING'",
            settings.default_idle_timeout,
        )


async def tick_with_ingest(settings: Settings) -> None:
    """One scheduler tick, with an ingest replica running and caught up, as in a deployment."""
    from consumer import runner

    async with service(settings, {"ingest"}):
        await wait_for(lambda: ingest_caught_up(settings), what="ingest caught up")
        assert await runner.run(settings, {"scheduler"}, once=True) == 0


async def transitions(store: Store, sandbox_id: str) -> list[tuple[str | None, str, str, str]]:
    """(from, to, reason, actor) of a sandbox's transitions, in order."""
    async with store.pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT from_state, to_state, reason, actor FROM session_transitions"
            " WHERE sandbox_id = $1 ORDER BY id",
            sandbox_id,
        )
    return [(r["from_state"], r["to_state"], r["reason"], r["actor"]) for r in rows]


async def row(store: Store, sandbox_id: str) -> dict[str, Any]:
    async with store.pool.acquire() as conn:
        found = await conn.fetchrow("SELECT * FROM sandbox_sessions WHERE sandbox_id = $1", sandbox_id)
    assert found is not None, f"no row for {sandbox_id}"
    return dict(found)


async def dead_letters(
    channel: aio_pika.abc.AbstractChannel, queue: str
) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Take every message of a dead-letter queue."""
    taken = []
    q = await channel.get_queue(queue)
    while (msg := await q.get(fail=False, no_ack=True)) is not None:
        taken.append(msg)
    return taken

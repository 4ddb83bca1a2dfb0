"""What every benchmark shares: figures, timing, condition polls, isolation, broker and database helpers.

Each measurement runs on its own Postgres schema and topology prefix, made
fresh and dropped afterwards, so runs never see each other's rows or queues.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import aio_pika
import asyncpg
from aio_pika.abc import AbstractChannel

from consumer.broker import declare_topology, delete_topology
from consumer.settings import Settings
from consumer.store import Store

if TYPE_CHECKING:
    from benchmarks.processes import Procs

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


@dataclass
class Figure:
    """One line of the results table."""

    bench: str
    name: str
    value: float | None
    unit: str
    target: str = ""
    ok: bool | None = None
    note: str = ""


def at_least(value: float | None, bound: float) -> tuple[str, bool | None]:
    """(target text, met?) for a lower bound."""
    return f">= {bound:g}", None if value is None else value >= bound


def at_most(value: float | None, bound: float) -> tuple[str, bool | None]:
    """(target text, met?) for an upper bound."""
    return f"<= {bound:g}", None if value is None else value <= bound


@dataclass
class Context:
    """What a benchmark gets: base settings, its sizes, the process registry and a place for details."""

    base: Settings
    sizes: Any
    procs: Procs
    profile: bool = True
    details: dict[str, Any] = field(default_factory=dict)
    tables: list[tuple[str, str]] = field(default_factory=list)  # (title, Markdown) printed after the results

    def say(self, text: str = "") -> None:
        print(text, flush=True)


class Timer:
    """Wall time on the monotonic clock."""

    def __init__(self) -> None:
        self.started = time.perf_counter()

    def restart(self) -> None:
        self.started = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started


async def wait_for(
    condition: Callable[[], Awaitable[T]], *, timeout: float, what: str, interval: float = 0.05
) -> T:
    """Poll ``condition`` until it returns something truthy; raise TimeoutError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = await condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what} (last: {value!r})")
        await asyncio.sleep(interval)


def dsn(settings: Settings) -> str:
    return settings.database_url.get_secret_value()


def amqp(settings: Settings) -> str:
    return settings.amqp_url.get_secret_value()


async def db_connect(settings: Settings) -> asyncpg.Connection:
    """A plain connection whose search_path is the settings' schema."""
    return await asyncpg.connect(
        dsn(settings),
        server_settings={"search_path": settings.database_schema, "application_name": "autopause-bench"},
    )


@contextlib.asynccontextmanager
async def isolated(base: Settings, label: str, **overrides: Any) -> AsyncIterator[Settings]:
    """Settings with a fresh, migrated schema and a fresh topology; both are removed afterwards."""
    tag = uuid.uuid4().hex[:8]
    settings = base.model_copy(
        update={"database_schema": f"bench_{label}_{tag}", "topology_prefix": f"bench{tag}.", **overrides}
    )
    store = await Store.connect(dsn(settings), settings.database_schema, size=2)
    try:
        await store.migrate()
    finally:
        await store.close()
    connection = await aio_pika.connect(amqp(settings))
    async with connection:
        await declare_topology(await connection.channel(), settings)
    try:
        yield settings
    finally:
        await drop(settings)


async def drop(settings: Settings, *, patience: float = 30) -> None:
    """Remove a schema and a topology prefix, retrying a while if a server is restarting."""
    deadline = time.monotonic() + patience
    while True:
        try:
            conn = await asyncpg.connect(dsn(settings))
            try:
                await conn.execute(f'DROP SCHEMA IF EXISTS "{settings.database_schema}" CASCADE')
            finally:
                await conn.close()
            connection = await aio_pika.connect(amqp(settings))
            async with connection:
                await delete_topology(await connection.channel(), settings.topology_prefix)
            return
        except (OSError, asyncpg.PostgresError, aio_pika.exceptions.AMQPError) as exc:
            if time.monotonic() > deadline:
                print(f"   could not clean up {settings.database_schema}: {exc!r}", file=sys.stderr)
                return
            await asyncio.sleep(1)


async def depth(channel: AbstractChannel, queue: str) -> tuple[int, int]:
    """(messages ready, consumers) of ``queue``, by a passive declare on ``channel``."""
    declared = await channel.declare_queue(queue, passive=True)
    result = declared.declaration_result
    return int(result.message_count or 0), int(result.consumer_count or 0)


async def first_delivery(
    channel: AbstractChannel,
    queue: str,
    total: int,
    *,
    check: Callable[[], None] = lambda: None,
    timeout: float = 60,
) -> float:
    """time.time() when the broker first handed messages of a full queue to a consumer.

    ``check`` runs at each poll (to raise when the consumer process died).
    """

    async def started() -> float:
        check()
        ready, _ = await depth(channel, queue)
        return time.time() if ready < total else 0.0

    return await wait_for(started, timeout=timeout, what=f"the first delivery from {queue}", interval=0.005)


async def consuming(channel: AbstractChannel, queue: str, *, timeout: float = 60) -> None:
    """Wait until ``queue`` has a consumer."""

    async def has_consumer() -> bool:
        return (await depth(channel, queue))[1] > 0

    await wait_for(has_consumer, timeout=timeout, what=f"a consumer on {queue}")


@contextlib.asynccontextmanager
async def connected(settings: Settings) -> AsyncIterator[tuple[asyncpg.Connection, AbstractChannel]]:
    """A database connection on the settings' schema and a broker channel with publisher confirms."""
    conn = await db_connect(settings)
    try:
        connection = await aio_pika.connect(amqp(settings))
        async with connection:
            yield conn, await connection.channel(publisher_confirms=True)
    finally:
        await conn.close()

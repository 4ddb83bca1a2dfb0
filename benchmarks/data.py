"""Benchmark data: a large session table seeded in Postgres, event streams, and pipelined publishing.

Seeded rows model a deployment that has run for a while: a fifth of the fleet
RUNNING (with a one-hour idle timeout, so none falls due during a run), half
PAUSED within the last three weeks, the rest KILLED; plus ``idle`` RUNNING
rows whose deadline has passed. Each row's last event arrived when it
happened (``last_arrived_at = last_activity``), so its deadline is the one the
state machine would have computed. Event times lie after every seeded activity,
so each event changes the row it touches.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import asyncpg
import orjson
from aio_pika.abc import AbstractExchange

from consumer.broker import message

SEED_PREFIX = "seed-"

_SEED = """
INSERT INTO sandbox_sessions (
    sandbox_id, project_id, user_id, template, idle_timeout_s, created_event_at,
    state, last_activity, last_arrived_at, pause_due_at, generation, paused_at, killed_at)
SELECT id, 'proj-' || (i % 50000), 'user-' || (i % 20000), 'base', timeout, last - interval '1 hour',
       state, last, last, last + make_interval(secs => coalesce(timeout, 600)),
       CASE WHEN state = 'PAUSED' THEN 1 ELSE 0 END,
       CASE WHEN state = 'PAUSED' THEN last + interval '600 seconds' END,
       CASE WHEN state = 'KILLED' THEN last END
FROM (
    SELECT i, id, state,
           CASE WHEN i <= $3 THEN now() - make_interval(secs => 601 + i % 3600)
                WHEN state = 'RUNNING' THEN now() - make_interval(secs => 200 + i % 200)
                ELSE now() - make_interval(days => 1 + i % 20, secs => i % 86400) END AS last,
           CASE WHEN i > $3 AND state = 'RUNNING' THEN 3600 END AS timeout
    FROM (
        SELECT i, $1 || lpad(i::text, 7, '0') AS id,
               CASE WHEN i <= $3 THEN 'RUNNING'
                    WHEN (hashint4(i) & 2147483647) % 100 < 20 THEN 'RUNNING'
                    WHEN (hashint4(i) & 2147483647) % 100 < 70 THEN 'PAUSED'
                    ELSE 'KILLED' END AS state
        FROM generate_series($4::int, $2::int) AS i
    ) AS g
) AS h
"""


def seed_id(i: int) -> str:
    return f"{SEED_PREFIX}{i:07d}"


async def seed_sessions(
    conn: asyncpg.Connection, total: int, *, idle: int = 0, chunk: int = 250_000
) -> float:
    """Insert ``total`` rows (the first ``idle`` of them due for a pause); seconds taken.

    The secondary indexes are dropped for the load and built again afterwards
    (from their own definitions), which halves the time; one generate_series
    INSERT per chunk bounds each transaction. VACUUM ANALYZE ends it, as
    autovacuum would have on a table that old.
    """
    started = time.perf_counter()
    indexes = await conn.fetch(
        """SELECT i.indexname, i.indexdef FROM pg_indexes AS i
           WHERE i.schemaname = current_schema() AND i.tablename = 'sandbox_sessions'
             AND i.indexname NOT IN (SELECT conname FROM pg_constraint)"""
    )
    for index in indexes:
        await conn.execute(f'DROP INDEX "{index["indexname"]}"')
    for low in range(1, total + 1, chunk):
        await conn.execute(_SEED, SEED_PREFIX, min(total, low + chunk - 1), idle, low)
    for index in indexes:
        await conn.execute(index["indexdef"])
    await conn.execute("VACUUM (ANALYZE) sandbox_sessions")
    return time.perf_counter() - started


async def seed_idle(conn: asyncpg.Connection, prefix: str, count: int) -> None:
    """``count`` RUNNING rows idle for two hours (the default 600 s timeout), ids ``prefix-000001``..."""
    await conn.execute(
        """INSERT INTO sandbox_sessions (sandbox_id, state, last_activity, last_arrived_at, pause_due_at)
           SELECT $1 || lpad(i::text, 6, '0'), 'RUNNING', now() - interval '2 hours',
                  now() - interval '2 hours', now() - interval '110 minutes'
           FROM generate_series(1, $2::int) AS i""",
        f"{prefix}-",
        count,
    )


def body(kind: str, sandbox_id: str, at: datetime) -> bytes:
    """A valid event of ``kind`` (created, activity, killed), as a producer would publish it."""
    data: dict[str, object] = {
        "event_id": str(uuid.uuid4()),
        "type": f"sandbox.{kind}",
        "occurred_at": at.isoformat(),
        "sandbox_id": sandbox_id,
    }
    if kind == "created":
        data.update(project_id="proj-bench", user_id="user-bench", template="base")
    elif kind == "activity":
        data["source"] = "terminal"
    return orjson.dumps(data)


@dataclass(frozen=True)
class Stream:
    """Events in publish order, and what the table must show once every one is committed."""

    items: list[tuple[str, bytes]]
    expected: dict[str, datetime]  # sandbox -> last_activity at least this

    @property
    def marker(self) -> tuple[str, datetime]:
        """The sandbox and time of the last event: the latest time of all."""
        sid = orjson.loads(self.items[-1][1])["sandbox_id"]
        return sid, self.expected[sid]


def mixed_stream(count: int, *, seeded: int, sandboxes: int, seed: int = 1) -> Stream:
    """``count`` events over ``sandboxes`` sandboxes, half of them seeded rows, half new.

    New sandboxes open with a created event; then activity (about 95%) and kills
    (about 2%) follow at random. Times rise by event, all within the last two minutes.
    """
    rng = random.Random(seed)
    start = datetime.now(UTC) - timedelta(seconds=110)
    step = timedelta(seconds=min(0.001, 90 / max(count, 1)))
    existing = rng.sample(range(1, seeded + 1), min(seeded, sandboxes // 2)) if seeded else []
    pool = [seed_id(i) for i in existing]
    born = set(pool)
    pool += [f"new-{uuid.uuid4().hex[:12]}" for _ in range(sandboxes - len(pool))]
    rng.shuffle(pool)
    items: list[tuple[str, bytes]] = []
    expected: dict[str, datetime] = {}
    for n in range(count):
        sid = pool[rng.randrange(len(pool))] if n >= len(pool) else pool[n]
        at = start + step * n
        if sid not in born:
            kind = "created"
            born.add(sid)
        else:
            kind = "killed" if rng.random() < 0.02 else "activity"
        items.append((f"sandbox.{kind}", body(kind, sid, at)))
        expected[sid] = at
    return Stream(items, expected)


def messages(items: Iterable[tuple[str, bytes]]) -> list[tuple[str, aio_pika.Message]]:
    """Persistent messages, built before any clock starts."""
    return [(key, message(data)) for key, data in items]


async def publish_pipelined(
    exchange: AbstractExchange, items: list[tuple[str, aio_pika.Message]], *, window: int = 1000
) -> tuple[float, float]:
    """Publish with confirms, ``window`` unconfirmed at most (a sliding window).

    Returns (time.time() of the first publish, of the last confirm).
    """
    slots = asyncio.Semaphore(window)
    failures: list[BaseException] = []

    def release(done: asyncio.Future[Any]) -> None:
        slots.release()
        if not done.cancelled() and done.exception() is not None:
            failures.append(done.exception())  # type: ignore[arg-type]

    pending = []
    first = time.time()
    for key, msg in items:
        await slots.acquire()
        future = asyncio.ensure_future(exchange.publish(msg, routing_key=key))
        future.add_done_callback(release)
        pending.append(future)
    await asyncio.gather(*pending, return_exceptions=True)
    if failures:
        raise RuntimeError(f"{len(failures)} publishes failed: {failures[0]!r}")
    return first, time.time()


async def all_committed(conn: asyncpg.Connection, expected: dict[str, datetime]) -> int:
    """How many sandboxes of ``expected`` show a last_activity at least the expected one."""
    ids = list(expected)
    count = await conn.fetchval(
        """SELECT count(*) FROM unnest($1::text[], $2::timestamptz[]) AS u(id, at)
           JOIN sandbox_sessions AS s ON s.sandbox_id = u.id AND s.last_activity >= u.at""",
        ids,
        [expected[i] for i in ids],
    )
    return int(count)


async def committed(conn: asyncpg.Connection, sandbox_id: str, at: datetime) -> bool:
    """Whether the row of ``sandbox_id`` shows activity at ``at`` or later."""
    return bool(
        await conn.fetchval(
            "SELECT last_activity >= $2 FROM sandbox_sessions WHERE sandbox_id = $1", sandbox_id, at
        )
    )

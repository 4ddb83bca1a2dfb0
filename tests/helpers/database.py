"""The rows of a test's schema, read as the assertions need them, and writes that fail on purpose."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg

from consumer.settings import Settings
from consumer.store import Store

from .config import DATABASE_URL
from .events import Rows


@contextlib.asynccontextmanager
async def database(settings: Settings) -> AsyncIterator[asyncpg.Connection]:
    """A connection of its own to the test's schema."""
    conn = await asyncpg.connect(DATABASE_URL, server_settings={"search_path": settings.database_schema})
    try:
        yield conn
    finally:
        await conn.close()


async def rows_of(store: Store) -> Rows:
    """sandbox -> (state, last_activity) of every row."""
    async with store.pool.acquire() as conn:
        records = await conn.fetch("SELECT sandbox_id, state, last_activity FROM sandbox_sessions")
    return {r["sandbox_id"]: (r["state"], r["last_activity"]) for r in records}


async def count_rows(store: Store) -> int:
    async with store.pool.acquire() as conn:
        return int(await conn.fetchval("SELECT count(*) FROM sandbox_sessions"))


async def states(store: Store) -> dict[str, str]:
    """sandbox -> state of every row."""
    async with store.pool.acquire() as conn:
        rows = await conn.fetch("SELECT sandbox_id, state FROM sandbox_sessions")
    return {r["sandbox_id"]: r["state"] for r in rows}


async def state_of(store: Store, sandbox_id: str) -> str | None:
    return (await states(store)).get(sandbox_id)


async def row(store: Store, sandbox_id: str) -> dict[str, Any]:
    """Every column of a sandbox's row; the test fails if there is none."""
    async with store.pool.acquire() as conn:
        found = await conn.fetchrow("SELECT * FROM sandbox_sessions WHERE sandbox_id = $1", sandbox_id)
    assert found is not None, f"no row for {sandbox_id}"
    return dict(found)


async def transitions(store: Store, sandbox_id: str) -> list[tuple[str | None, str, str, str]]:
    """(from, to, reason, actor) of a sandbox's transitions, in order."""
    async with store.pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT from_state, to_state, reason, actor FROM session_transitions"
            " WHERE sandbox_id = $1 ORDER BY id",
            sandbox_id,
        )
    return [(r["from_state"], r["to_state"], r["reason"], r["actor"]) for r in rows]


async def reasons(store: Store, sandbox_id: str) -> list[str]:
    """The reasons of a sandbox's transitions, in order."""
    return [reason for _, _, reason, _ in await transitions(store, sandbox_id)]


async def has_transition(store: Store, sandbox_id: str, reason: str) -> bool:
    return reason in await reasons(store, sandbox_id)


async def ticks(store: Store) -> list[dict[str, Any]]:
    """The scheduler's tick records, oldest first."""
    async with store.pool.acquire() as conn:
        return [dict(r) for r in await conn.fetch("SELECT * FROM scheduler_ticks ORDER BY tick_at")]


async def ingest_caught_up(settings: Settings) -> bool:
    """An ingest replica beats and has committed a watermark: the scheduler may claim."""
    async with database(settings) as conn:
        n = await conn.fetchval(
            "SELECT count(*) FROM ingest_replicas"
            " WHERE watermark IS NOT NULL AND beat_at > now() - interval '5 seconds'"
        )
    return bool(n)


async def held_at_least(store: Store, n: int) -> bool:
    """Ingest replicas hold at least ``n`` events taken but not yet written."""
    async with store.pool.acquire() as conn:
        return bool(await conn.fetchval("SELECT coalesce(sum(held), 0) >= $1 FROM ingest_replicas", n))


async def arrived_long_ago(settings: Settings) -> None:
    """Make every row's events look as old on arrival as their stamps say: idle rows become due."""
    async with database(settings) as conn:
        await conn.execute(
            "UPDATE sandbox_sessions SET last_arrived_at = last_activity,"
            " pause_due_at = last_activity + make_interval(secs => coalesce(idle_timeout_s, $1))"
            " WHERE state = 'RUNNING'",
            settings.default_idle_timeout,
        )


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


# through fresh connections, for tests that restart PostgreSQL ------------------------------------


async def fresh_rows(settings: Settings) -> Rows | None:
    """sandbox -> (state, last_activity), or None while Postgres does not answer."""
    try:
        conn = await asyncpg.connect(
            DATABASE_URL, timeout=5, server_settings={"search_path": settings.database_schema}
        )
    except Exception:
        return None
    try:
        records = await conn.fetch("SELECT sandbox_id, state, last_activity FROM sandbox_sessions")
    except (asyncpg.UndefinedTableError, asyncpg.PostgresConnectionError, OSError):
        return None
    finally:
        with contextlib.suppress(Exception):
            await conn.close()
    return {r["sandbox_id"]: (r["state"], r["last_activity"]) for r in records}


async def fresh_count(settings: Settings) -> int:
    return len(await fresh_rows(settings) or {})


async def fresh_states(settings: Settings) -> dict[str, str]:
    return {sid: state for sid, (state, _) in (await fresh_rows(settings) or {}).items()}


async def settle(settings: Settings, expected: Rows, timeout: float, what: str) -> None:
    """Wait until the table holds exactly ``expected``; fail with a summary of the difference."""
    deadline = time.monotonic() + timeout
    rows = await fresh_rows(settings)
    while rows != expected and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        rows = await fresh_rows(settings)
    rows = rows or {}
    missing = sorted(set(expected) - set(rows))
    wrong = sorted(s for s in expected if s in rows and rows[s] != expected[s])
    extra = sorted(set(rows) - set(expected))
    assert rows == expected, (
        f"{what}: {len(missing)} missing (e.g. {missing[:3]}), {len(wrong)} wrong "
        f"(e.g. {[(s, rows[s], expected[s]) for s in wrong[:2]]}), {len(extra)} unexpected"
    )

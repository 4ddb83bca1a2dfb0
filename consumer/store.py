"""The Postgres store: runs the named statements of ``sql/queries.sql`` and returns typed rows.

asyncpg and OS errors that mean "the database is not there" become
:class:`~consumer.errors.StoreUnavailable`; the roles retry on it.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any

import asyncpg
import orjson
from asyncpg.pool import PoolConnectionProxy

from consumer.errors import StoreRejected, StoreUnavailable
from consumer.migrate import migrate
from consumer.state import Applied, Delta, Session, State, Transition

if TYPE_CHECKING:
    Connection = PoolConnectionProxy[asyncpg.Record]
_BLOCK = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)

# What "the database is down or restarting" looks like from asyncpg.
UNAVAILABLE = (
    OSError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.ConnectionFailureError,
    # a pooled session that Postgres has just terminated fails its next command this way
    asyncpg.exceptions.InternalClientError,
    TimeoutError,
)


@cache
def queries() -> dict[str, str]:
    """The named SQL blocks, loaded once."""
    text = resources.files("consumer.sql").joinpath("queries.sql").read_text()
    parts = _BLOCK.split(text)
    return {name: body.strip() for name, body in zip(parts[1::2], parts[2::2], strict=True)}


async def _keep_session(_: object) -> None:
    """Pool reset that sends nothing.

    The statements here leave no session state behind (no LISTEN, cursors or
    SET; advisory locks are released by their holders), so the default reset
    query, one more round trip on every release, buys nothing. asyncpg still
    rolls back a transaction left open.
    """


@dataclass(frozen=True)
class Claim:
    sandbox_id: str
    generation: int


@dataclass(frozen=True)
class BatchOutcome:
    """What one ingest transaction did."""

    sessions: int
    transitions: tuple[Transition, ...]
    stale_events: int


def _session(row: asyncpg.Record) -> Session:
    return Session(
        sandbox_id=row["sandbox_id"],
        state=State(row["state"]),
        last_activity=row["last_activity"],
        pause_due_at=row["pause_due_at"],
        project_id=row["project_id"],
        user_id=row["user_id"],
        template=row["template"],
        idle_timeout_s=row["idle_timeout_s"],
        metadata=orjson.loads(row["metadata"]) if row["metadata"] else {},
        created_event_id=row["created_event_id"],
        created_event_at=row["created_event_at"],
        generation=row["generation"],
        claimed_activity=row["claimed_activity"],
        paused_at=row["paused_at"],
        killed_at=row["killed_at"],
        keep_alive_until=row["keep_alive_until"],
        retry_after=row["retry_after"],
    )


def _columns(sessions: list[Session], *, with_claim: bool) -> list[list[Any]]:
    columns: list[list[Any]] = [
        [s.sandbox_id for s in sessions],
        [s.project_id for s in sessions],
        [s.user_id for s in sessions],
        [s.template for s in sessions],
        [s.idle_timeout_s for s in sessions],
        [orjson.dumps(s.metadata).decode() for s in sessions],
        [s.created_event_id for s in sessions],
        [s.created_event_at for s in sessions],
        [s.state.value for s in sessions],
        [s.last_activity for s in sessions],
        [s.pause_due_at for s in sessions],
        [s.killed_at for s in sessions],
    ]
    if with_claim:
        columns.append([s.claimed_activity for s in sessions])
    return columns


Decide = Callable[[Session | None, Delta], Applied]


class Store:
    """One asyncpg pool and the statements autopause runs on it."""

    def __init__(self, pool: asyncpg.Pool, schema: str) -> None:
        self.pool = pool
        self.schema = schema

    @classmethod
    async def connect(cls, dsn: str, schema: str, *, size: int = 10, timeout: float = 10) -> Store:
        """Open a pool whose connections use ``schema``; raise StoreUnavailable if Postgres is not there."""
        try:
            pool = await asyncpg.create_pool(
                dsn,
                min_size=1,
                max_size=size,
                timeout=timeout,
                command_timeout=60,
                server_settings={"search_path": schema, "application_name": "autopause"},
                reset=_keep_session,
            )
        except UNAVAILABLE as exc:
            raise StoreUnavailable(f"PostgreSQL unreachable: {type(exc).__name__}: {exc}") from exc
        assert pool is not None
        return cls(pool, schema)

    async def close(self) -> None:
        await self.pool.close()

    @asynccontextmanager
    async def _conn(self) -> AsyncIterator[Connection]:
        try:
            async with self.pool.acquire() as conn:
                yield conn
        except UNAVAILABLE as exc:
            raise StoreUnavailable(f"PostgreSQL unavailable: {type(exc).__name__}: {exc}") from exc
        except (asyncpg.exceptions.DataError, asyncpg.exceptions.IntegrityConstraintViolationError) as exc:
            raise StoreRejected(f"PostgreSQL refused the data: {type(exc).__name__}: {exc}") from exc

    async def migrate(self) -> list[int]:
        async with self._conn() as conn:
            return await migrate(conn, self.schema)

    async def ping(self) -> None:
        async with self._conn() as conn:
            await conn.fetchval("SELECT 1")

    # ingest

    async def apply_batch(self, deltas: dict[str, Delta], decide: Decide) -> BatchOutcome:
        """Lock the batch's rows, let ``decide`` compute each new row, write them, in one transaction.

        Rows are locked in sandbox-id order so that concurrent batches cannot
        deadlock. A row that another replica inserts between our read and our
        insert is read again and decided again within the same transaction.
        """
        sql = queries()
        transitions: list[Transition] = []
        stale = 0
        pending = dict(deltas)
        async with self._conn() as conn, conn.transaction():
            while pending:
                ids = sorted(pending)
                current = {r["sandbox_id"]: _session(r) for r in await conn.fetch(sql["lock_sessions"], ids)}
                decided = {sid: decide(current.get(sid), pending[sid]) for sid in ids}
                fresh = [a.session for sid, a in decided.items() if sid not in current]
                changed = [a.session for sid, a in decided.items() if sid in current and a.changed]
                inserted: set[str] = set()
                if fresh:
                    rows = await conn.fetch(sql["insert_sessions"], *_columns(fresh, with_claim=False))
                    inserted = {r["sandbox_id"] for r in rows}
                if changed:
                    await conn.execute(sql["update_sessions"], *_columns(changed, with_claim=True))
                raced = {s.sandbox_id for s in fresh} - inserted
                for sid, applied in decided.items():
                    if sid not in raced:
                        transitions.extend(applied.transitions)
                        stale += applied.stale_events
                pending = {sid: pending[sid] for sid in raced}
            await self._log(conn, transitions, "ingest")
        return BatchOutcome(len(deltas), tuple(transitions), stale)

    async def _log(self, conn: Connection, transitions: Iterable[Transition], actor: str) -> None:
        items = list(transitions)
        if not items:
            return
        await conn.execute(
            queries()["insert_transitions"],
            [t.sandbox_id for t in items],
            [t.from_state.value if t.from_state else None for t in items],
            [t.to_state.value for t in items],
            [t.reason for t in items],
            [actor] * len(items),
            [t.generation for t in items],
        )

    # scheduler

    @asynccontextmanager
    async def tick_lock(self, name: str) -> AsyncIterator[bool]:
        """Hold a cluster-wide advisory lock for one tick; yields False if another replica holds it."""
        async with self._conn() as conn:
            got = bool(await conn.fetchval(queries()["try_tick_lock"], name))
            try:
                yield got
            finally:
                if got:
                    await conn.fetchval(queries()["tick_unlock"], name)

    async def start_tick(self, tick_at: datetime, replica: str) -> bool:
        """Record a tick; False if another replica already took this one."""
        async with self._conn() as conn:
            return await conn.fetchval(queries()["start_tick"], tick_at, replica) is not None

    async def finish_tick(
        self,
        tick_at: datetime,
        *,
        claimed: int,
        republished: int,
        expired: int,
        skipped: str | None,
        error: str | None,
    ) -> None:
        async with self._conn() as conn:
            await conn.execute(
                queries()["finish_tick"], tick_at, claimed, republished, expired, skipped, error
            )

    async def running_count(self) -> int:
        async with self._conn() as conn:
            return int(await conn.fetchval(queries()["running_count"]))

    async def claim_idle(self, limit: int) -> list[Claim]:
        """Move up to ``limit`` idle RUNNING rows to PAUSING with a new generation; commit; return them."""
        async with self._conn() as conn:
            rows = await conn.fetch(queries()["claim_idle"], limit)
        return [Claim(r["sandbox_id"], r["generation"]) for r in rows]

    async def claim_one(self, sandbox_id: str, reason: str, actor: str) -> Claim | None:
        async with self._conn() as conn:
            row = await conn.fetchrow(queries()["claim_one"], sandbox_id, reason, actor)
        return Claim(row["sandbox_id"], row["generation"]) if row else None

    async def renew_expired_leases(self, lease_s: float, limit: int) -> list[Claim]:
        async with self._conn() as conn:
            rows = await conn.fetch(queries()["renew_expired_leases"], lease_s, limit)
        return [Claim(r["sandbox_id"], r["generation"]) for r in rows]

    async def expire_paused(self, days: float, limit: int) -> int:
        async with self._conn() as conn:
            return int(await conn.fetchval(queries()["expire_paused"], days, limit))

    # worker

    async def command_backed(self, sandbox_id: str, generation: int) -> bool:
        async with self._conn() as conn:
            return await conn.fetchval(queries()["command_backed"], sandbox_id, generation) is not None

    async def finish_pause(
        self,
        claim: Claim,
        to_state: State,
        reason: str,
        *,
        attempts: int,
        error: str | None = None,
        retry_after: datetime | None = None,
        due_at: datetime | None = None,
    ) -> bool:
        """Compare-and-set the outcome of a pause; False if the row no longer backs the claim."""
        async with self._conn() as conn:
            moved = await conn.fetchval(
                queries()["finish_pause"],
                claim.sandbox_id,
                claim.generation,
                to_state.value,
                error,
                retry_after,
                due_at,
                attempts,
                reason,
            )
        return bool(moved)

    async def record_attempt(self, claim: Claim, attempts: int, error: str) -> bool:
        async with self._conn() as conn:
            await conn.execute(
                queries()["record_attempt"], claim.sandbox_id, claim.generation, attempts, error
            )
        return True

    # operations

    async def keep_alive(self, sandbox_id: str, until: datetime) -> str | None:
        async with self._conn() as conn:
            state: str | None = await conn.fetchval(queries()["keep_alive"], sandbox_id, until)
            return state

    async def get_session(self, sandbox_id: str) -> asyncpg.Record | None:
        async with self._conn() as conn:
            return await conn.fetchrow(queries()["get_session"], sandbox_id)

    async def transitions_of(self, sandbox_id: str) -> list[asyncpg.Record]:
        async with self._conn() as conn:
            return list(await conn.fetch(queries()["session_transitions"], sandbox_id))

    async def list_sessions(
        self,
        *,
        project: str | None,
        user: str | None,
        state: str | None,
        idle_longer_than: float | None,
        limit: int,
    ) -> list[asyncpg.Record]:
        async with self._conn() as conn:
            return list(
                await conn.fetch(queries()["list_sessions"], project, user, state, idle_longer_than, limit)
            )

    async def count_by_state(self) -> dict[str, int]:
        async with self._conn() as conn:
            rows = await conn.fetch(queries()["count_by_state"])
        counts = {state.value: 0 for state in State}
        counts.update({r["state"]: r["n"] for r in rows})
        return counts

    async def last_tick(self) -> asyncpg.Record | None:
        async with self._conn() as conn:
            return await conn.fetchrow(queries()["last_tick"])

    async def transitions_since(self, seconds: float) -> dict[tuple[str, str], int]:
        async with self._conn() as conn:
            rows = await conn.fetch(queries()["transitions_since"], seconds)
        return {(r["to_state"], r["reason"]): r["n"] for r in rows}

    async def paused_seconds(self) -> float:
        async with self._conn() as conn:
            return float(await conn.fetchval(queries()["paused_seconds"]))

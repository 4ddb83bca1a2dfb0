"""The pool, error translation, and the four ways a named statement is run.

Errors are translated here. PostgreSQL refusing a value for its data (a data
exception or a constraint) is :class:`~consumer.errors.StoreRejected`: retrying
the same statement cannot help. Everything else the driver raises (the server
gone or restarting, a read-only standby after a failover, a full disk, a
cancelled statement) is :class:`~consumer.errors.StoreUnavailable`: the roles
hold their work and retry, they never exit and never reject valid input.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Self

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from consumer.errors import StoreRejected, StoreUnavailable
from consumer.migrate import migrate
from consumer.store.sql import QueryName, queries

if TYPE_CHECKING:
    Connection = PoolConnectionProxy[asyncpg.Record]

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
# PostgreSQL refusing the data itself: retrying the same statement cannot help.
REJECTED = (asyncpg.exceptions.DataError, asyncpg.exceptions.IntegrityConstraintViolationError)


async def _keep_session(_: object) -> None:
    """Pool reset that sends nothing.

    The statements here leave no session state behind (no LISTEN, cursors or
    SET; advisory locks are released by their holders), so the default reset
    query, one more round trip on every release, buys nothing. asyncpg still
    rolls back a transaction left open.
    """


class StoreBase:
    """One asyncpg pool whose connections use one schema."""

    def __init__(self, pool: asyncpg.Pool, schema: str) -> None:
        self.pool = pool
        self.schema = schema

    @classmethod
    async def connect(cls, dsn: str, schema: str, *, size: int = 10, timeout: float = 10) -> Self:
        """Open a pool whose connections use ``schema``; raise StoreUnavailable if Postgres is not there."""
        queries()  # a broken queries.sql fails here, before anything runs
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
        except REJECTED as exc:
            raise StoreRejected(f"PostgreSQL refused the data: {type(exc).__name__}: {exc}") from exc
        except asyncpg.exceptions.PostgresError as exc:
            raise StoreUnavailable(f"PostgreSQL failed: {type(exc).__name__}: {exc}") from exc

    async def _val(self, name: QueryName, *args: Any) -> Any:
        """The first column of the first row."""
        async with self._conn() as conn:
            return await conn.fetchval(queries()[name], *args)

    async def _row(self, name: QueryName, *args: Any) -> asyncpg.Record | None:
        async with self._conn() as conn:
            return await conn.fetchrow(queries()[name], *args)

    async def _one(self, name: QueryName, *args: Any) -> asyncpg.Record:
        """The row of a statement that always returns exactly one (an aggregate, a CTE's summary)."""
        row = await self._row(name, *args)
        if row is None:
            raise StoreUnavailable(f"statement {name} returned no row")
        return row

    async def _rows(self, name: QueryName, *args: Any) -> list[asyncpg.Record]:
        async with self._conn() as conn:
            return list(await conn.fetch(queries()[name], *args))

    async def _exec(self, name: QueryName, *args: Any) -> int:
        """Run a statement; the number of rows its status reports (``UPDATE 3`` is 3)."""
        async with self._conn() as conn:
            status: str = await conn.execute(queries()[name], *args)
        last = status.rsplit(" ", 1)[-1]
        return int(last) if last.isdigit() else 0

    async def migrate(self) -> list[int]:
        async with self._conn() as conn:
            return await migrate(conn, self.schema)

    async def ping(self) -> None:
        async with self._conn() as conn:
            await conn.fetchval("SELECT 1")

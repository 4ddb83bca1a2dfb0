"""The shipped Postgres init script: autopause runs as a role that owns its schema and nothing more.

The script runs against a throwaway database of the shared server, as the
postgres image would run it; then the migrations and the store work as that
role, and everything beyond its schema is refused.
"""

from __future__ import annotations

import secrets
import subprocess
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from consumer.migrate import bundled_migrations
from consumer.store import Store

from ..helpers.config import DATABASE_URL, ROOT
from ..helpers.processes import clean_env, run_sync

INIT_SCRIPT = ROOT / "deploy" / "postgres" / "10-autopause-role.sh"
SCHEMA = "autopause"


@dataclass(frozen=True)
class Database:
    name: str
    role: str
    password: str

    def url(self, user: str | None = None) -> str:
        parsed = urlsplit(DATABASE_URL)
        login = user or self.role
        netloc = f"{login}:{self.password}@{parsed.hostname}:{parsed.port or 5432}"
        return urlunsplit((parsed.scheme, netloc, f"/{self.name}", "", ""))


def run_init(database: Database) -> subprocess.CompletedProcess[str]:
    parsed = urlsplit(DATABASE_URL)
    env = clean_env(
        PGHOST=parsed.hostname or "127.0.0.1",
        PGPORT=str(parsed.port or 5432),
        POSTGRES_USER=parsed.username or "postgres",
        POSTGRES_DB=database.name,
        AUTOPAUSE_DB_PASSWORD=database.password,
        AUTOPAUSE_DB_ROLE=database.role,
    )
    return run_sync(["bash", str(INIT_SCRIPT)], env, timeout=60)


@pytest.fixture
async def database() -> AsyncIterator[Database]:
    seed = uuid.uuid4().hex[:10]
    made = Database(f"autopause_init_{seed}", f"autopause_{seed}", secrets.token_hex(16))
    admin = await asyncpg.connect(DATABASE_URL)
    try:
        await admin.execute(f'CREATE DATABASE "{made.name}"')
        yield made
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{made.name}" WITH (FORCE)')
        await admin.execute(f'DROP ROLE IF EXISTS "{made.role}"')
        await admin.close()


async def test_the_application_role_owns_its_schema_and_nothing_more(database: Database) -> None:
    done = run_init(database)
    assert done.returncode == 0, done.stderr
    assert run_init(database).returncode == 0, "the script must be safe to run again"

    conn = await asyncpg.connect(database.url())
    try:
        rights = await conn.fetchrow(
            "SELECT rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolbypassrls"
            " FROM pg_roles WHERE rolname = current_user"
        )
        assert rights is not None and not any(rights.values())
        owner = await conn.fetchval(
            "SELECT pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = $1", SCHEMA
        )
        assert owner == database.role
        assert await conn.fetchval("SHOW search_path") == SCHEMA
        for statement in (
            "CREATE SCHEMA elsewhere",
            "CREATE TABLE public.intruder (a int)",
            f'CREATE DATABASE "{database.name}_more"',
            "CREATE ROLE accomplice",
            "ALTER ROLE current_user SUPERUSER",
        ):
            with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError):
                await conn.execute(statement)
    finally:
        await conn.close()

    # the migrations run as that role (twice: every replica migrates at start), and the store works
    store = await Store.connect(database.url(), SCHEMA, size=2)
    try:
        assert await store.migrate() == [m.version for m in bundled_migrations()]
        assert await store.migrate() == []
        assert set((await store.count_by_state()).values()) == {0}
    finally:
        await store.close()
    conn = await asyncpg.connect(database.url())
    try:
        tables = await conn.fetch("SELECT tablename, tableowner FROM pg_tables WHERE schemaname = $1", SCHEMA)
        assert tables and {row["tableowner"] for row in tables} == {database.role}
    finally:
        await conn.close()

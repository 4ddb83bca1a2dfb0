"""Versioned SQL migrations, applied in order, once, even with several replicas starting at once."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import resources

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from consumer.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def bundled_migrations() -> list[Migration]:
    """The migrations shipped in ``consumer/migrations``, ordered by version."""
    found = []
    for entry in resources.files("consumer.migrations").iterdir():
        if not entry.name.endswith(".sql"):
            continue
        number, _, rest = entry.name.partition("_")
        if not number.isdigit():
            raise ConfigError(f"migration file {entry.name!r} must start with its version number")
        found.append(Migration(int(number), rest.removesuffix(".sql"), entry.read_text()))
    found.sort(key=lambda m: m.version)
    if len({m.version for m in found}) != len(found):
        raise ConfigError("two migration files share a version number")
    return found


async def migrate(
    connection: asyncpg.Connection | PoolConnectionProxy[asyncpg.Record], schema: str
) -> list[int]:
    """Apply the pending migrations to ``schema``; return the versions applied.

    A session-level advisory lock serialises replicas that start together: the
    second waits, then finds nothing left to do.
    """
    lock_key = f"autopause.migrate.{schema}"
    await connection.execute("SELECT pg_advisory_lock(hashtext($1))", lock_key)
    try:
        # CREATE SCHEMA IF NOT EXISTS needs CREATE on the database even when the schema is
        # there; the application role owns its schema and has no such right
        if not await connection.fetchval("SELECT 1 FROM pg_namespace WHERE nspname = $1", schema):
            await connection.execute(f'CREATE SCHEMA "{schema}"')
        await connection.execute(f'SET search_path TO "{schema}"')
        await connection.execute(
            """CREATE TABLE IF NOT EXISTS autopause_migrations (
                   version integer PRIMARY KEY,
                   name text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        done = {r["version"] for r in await connection.fetch("SELECT version FROM autopause_migrations")}
        applied = []
        for migration in bundled_migrations():
            if migration.version in done:
                continue
            async with connection.transaction():
                await connection.execute(migration.sql)
                await connection.execute(
                    "INSERT INTO autopause_migrations (version, name) VALUES ($1, $2)",
                    migration.version,
                    migration.name,
                )
            log.info(
                "migration applied",
                extra={"action": "migrate.applied", "version": migration.version},
            )
            applied.append(migration.version)
        return applied
    finally:
        await connection.execute("SELECT pg_advisory_unlock(hashtext($1))", lock_key)

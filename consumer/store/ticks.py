"""The scheduler's statements: the tick's lease and record, claims, and upkeep of the table."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import orjson

from consumer.state import Reason, State
from consumer.store.base import StoreBase
from consumer.store.records import Claim, IngestView, Probe, ReplicaBeat, TickStart
from consumer.store.sql import queries


class TickStatements(StoreBase):
    @asynccontextmanager
    async def advisory_lock(self, name: str) -> AsyncIterator[bool]:
        """Hold a cluster-wide advisory lock for a long run; yields False if another replica holds it."""
        async with self._conn() as conn:
            got = bool(await conn.fetchval(queries()["try_advisory_lock"], name))
            try:
                yield got
            finally:
                if got:
                    await conn.fetchval(queries()["advisory_unlock"], name)

    async def begin_tick(self, lease: str, tick_at: datetime, replica: str, lease_s: float) -> TickStart:
        """Take the tick lease and record the tick in one round trip."""
        row = await self._one("begin_tick", lease, tick_at, replica, lease_s)
        if row["leased"] and not row["started"]:
            await self.release_lease(lease, replica)
        return TickStart(leased=row["leased"], started=row["started"])

    async def release_lease(self, lease: str, holder: str) -> None:
        await self._exec("release_lease", lease, holder)

    async def finish_tick(
        self,
        lease: str,
        replica: str,
        tick_at: datetime,
        *,
        claimed: int,
        republished: int,
        expired: int,
        skipped: str | None,
        error: str | None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        figures = orjson.dumps(detail).decode() if detail is not None else None
        await self._exec(
            "finish_tick", tick_at, claimed, republished, expired, skipped, error, figures, lease, replica
        )

    async def renew_leases_and_probe(self, lease_s: float, limit: int) -> Probe:
        """The first batch of expired claims, renewed, and the first deadline of a RUNNING row."""
        row = await self._one("renew_leases_and_probe", lease_s, limit)
        renewed = [Claim(i, g) for i, g in zip(row["sandbox_ids"], row["generations"], strict=True)]
        return Probe(now=row["now"], first_due=row["due"], renewed=renewed)

    async def renew_expired_leases(self, lease_s: float, limit: int) -> list[Claim]:
        rows = await self._rows("renew_expired_leases", lease_s, limit)
        return [Claim(r["sandbox_id"], r["generation"]) for r in rows]

    async def running_count(self) -> int:
        return int(await self._val("running_count"))

    async def claim_idle(self, limit: int, until: datetime) -> list[Claim]:
        """Move up to ``limit`` RUNNING rows due by ``until`` (and now) to PAUSING; commit; return them."""
        rows = await self._rows("claim_idle", limit, until)
        return [Claim(r["sandbox_id"], r["generation"]) for r in rows]

    async def release_claims(self, claims: Sequence[Claim], reason: Reason) -> int:
        """Return claims whose commands never went out to RUNNING, with their old deadline."""
        if not claims:
            return 0
        ids, generations = [c.sandbox_id for c in claims], [c.generation for c in claims]
        return int(await self._val("release_claims", ids, generations, reason.value))

    async def ingest_view(self) -> IngestView:
        """The database's clock and every ingest replica's row, for the freshness gate."""
        rows = await self._rows("ingest_replicas")
        beats = tuple(
            ReplicaBeat(r["replica"], r["beat_at"], r["held"], r["held_redelivered"], r["watermark"])
            for r in rows
            if r["replica"] is not None
        )
        return IngestView(rows[0]["now"], beats)

    async def make_due(self, sandbox_id: str) -> State | None:
        """Make a RUNNING row due for a pause now; the row's state (None: no such row)."""
        state: str | None = await self._val("make_due", sandbox_id)
        return State(state) if state is not None else None

    # upkeep, at most every few seconds

    async def unpark_dry_run(self, default_timeout_s: float, limit: int) -> int:
        """Make rows a dry run parked due again; the number moved."""
        return await self._exec("unpark_dry_run", default_timeout_s, limit)

    async def expire_paused(self, days: float, limit: int) -> int:
        return int(await self._val("expire_paused", days, limit))

    async def retire_ingest(self, silent_for_s: float) -> None:
        await self._exec("retire_ingest", silent_for_s)

    async def prune_ticks(self) -> None:
        await self._exec("prune_ticks")

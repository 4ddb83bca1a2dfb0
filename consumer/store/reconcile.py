"""Reconcile's statements: the table compared with E2B's listing, and the repairs that follow."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import orjson

from consumer.state import State
from consumer.store.base import StoreBase
from consumer.store.records import LiveRow, SandboxFacts


class ReconcileStatements(StoreBase):
    async def db_now(self) -> datetime:
        now: datetime = await self._val("db_now")
        return now

    async def start_reconcile(self, run_at: datetime, replica: str) -> bool:
        """Record a run; False when another replica already ran this scheduled time."""
        return await self._val("start_reconcile", run_at, replica) is not None

    async def finish_reconcile(
        self, run_at: datetime, *, listed: int, requests: int, changes: dict[str, int], error: str | None
    ) -> None:
        await self._exec("finish_reconcile", run_at, listed, requests, orjson.dumps(changes).decode(), error)

    async def reconcile_view(self, listed_ids: list[str], listed_at: datetime) -> list[LiveRow]:
        rows = await self._rows("reconcile_view", listed_ids, listed_at)
        return [
            LiveRow(r["sandbox_id"], State(r["state"]), bool(r["listed"]), bool(r["settled"])) for r in rows
        ]

    async def known_sandboxes(self, sandbox_ids: list[str]) -> set[str]:
        return {r["sandbox_id"] for r in await self._rows("known_sandboxes", sandbox_ids)}

    async def resumed_outside(self, sandbox_ids: list[str], listed_at: datetime, timeout_s: float) -> int:
        return len(await self._rows("resumed_outside", sandbox_ids, listed_at, timeout_s))

    async def paused_outside(self, sandbox_ids: list[str], listed_at: datetime) -> int:
        return len(await self._rows("paused_outside", sandbox_ids, listed_at))

    async def mark_gone(self, sandbox_id: str, listed_at: datetime) -> bool:
        return bool(await self._val("gone", sandbox_id, listed_at))

    async def adopt(self, sandboxes: Sequence[SandboxFacts], timeout_s: float) -> int:
        rows = await self._rows(
            "adopt",
            [s.sandbox_id for s in sandboxes],
            [orjson.dumps(dict(s.metadata)).decode() for s in sandboxes],
            [s.cpu_count for s in sandboxes],
            [s.memory_mb for s in sandboxes],
            [s.end_at for s in sandboxes],
            timeout_s,
        )
        return len(rows)

    async def record_sizes(self, sandboxes: Sequence[SandboxFacts], listed_at: datetime) -> None:
        await self._exec(
            "record_sizes",
            [s.sandbox_id for s in sandboxes],
            [s.cpu_count for s in sandboxes],
            [s.memory_mb for s in sandboxes],
            [s.end_at for s in sandboxes],
            listed_at,
        )

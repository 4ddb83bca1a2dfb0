"""The worker's statements: compare-and-sets around each E2B call, and repairs of pauses that hit use."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from uuid import UUID

import asyncpg
import orjson

from consumer.state import Reason, State
from consumer.store.base import StoreBase
from consumer.store.records import Attempt, Backing, Claim, PauseEnd, PauseFinished, Repair


def _repair(row: asyncpg.Record) -> Repair:
    return Repair(row["sandbox_id"], row["last_activity"], row["claimed_activity"], row["lifetime_left_s"])


class PauseStatements(StoreBase):
    async def commands_backed(self, claims: Sequence[Claim]) -> list[Backing]:
        """Whether each claim's row still backs its command, in order, with its end of life."""
        rows = await self._rows(
            "commands_backed", [c.sandbox_id for c in claims], [c.generation for c in claims]
        )
        return [Backing(bool(r["backed"]), r["e2b_end_at"], r["e2b_seen_at"]) for r in rows]

    async def begin_attempts(
        self, attempts: Sequence[tuple[Claim, UUID, int]], hold_s: float
    ) -> list[Attempt]:
        """The compare-and-set before E2B is called, for claims of distinct sandboxes (queries.sql)."""
        rows = await self._rows(
            "begin_attempts",
            [c.sandbox_id for c, _, _ in attempts],
            [c.generation for c, _, _ in attempts],
            [attempt_id for _, attempt_id, _ in attempts],
            [n for _, _, n in attempts],
            hold_s,
        )
        return [
            Attempt(
                bool(r["taken"]),
                bool(r["backed"]),
                r["claimed_activity"],
                float(r["held_for"] or 0),
                r["idle_timeout_s"],
            )
            for r in rows
        ]

    async def renew_attempt(self, claim: Claim, attempt_id: UUID, hold_s: float) -> bool:
        """Extend this attempt's hold; False if it ran out (another attempt may hold the row)."""
        renewed = await self._val("renew_attempt", claim.sandbox_id, claim.generation, attempt_id, hold_s)
        return renewed is not None

    async def record_attempt(self, claim: Claim, attempt_id: UUID, attempts: int, error: str) -> None:
        await self._exec("record_attempt", claim.sandbox_id, claim.generation, attempt_id, attempts, error)

    async def finish_pauses(self, ends: Sequence[tuple[Claim, UUID, PauseEnd]]) -> list[PauseFinished]:
        """Compare-and-set the ends of pauses of distinct sandboxes, and where rows that did not move are."""
        rows = await self._rows(
            "finish_pauses",
            [c.sandbox_id for c, _, _ in ends],
            [c.generation for c, _, _ in ends],
            [attempt_id for _, attempt_id, _ in ends],
            [e.to_state.value for _, _, e in ends],
            [e.error for _, _, e in ends],
            [e.retry_after for _, _, e in ends],
            [e.due_at for _, _, e in ends],
            [e.dry_run_at for _, _, e in ends],
            [e.attempts for _, _, e in ends],
            [e.end_at for _, _, e in ends],
            [e.lifetime_left_s for _, _, e in ends],
            [e.check_e2b_later for _, _, e in ends],
            [e.reason.value for _, _, e in ends],
        )
        return [PauseFinished(bool(r["moved"]), State(r["state"]) if r["state"] else None) for r in rows]

    async def take_repairs(self, holder: UUID, hold_s: float, limit: int) -> list[Repair]:
        rows = await self._rows("take_repairs", holder, hold_s, limit)
        return [_repair(r) for r in rows]

    async def take_own_repair(self, sandbox_id: str, attempt_id: UUID, hold_s: float) -> Repair | None:
        row = await self._row("take_own_repair", sandbox_id, attempt_id, hold_s)
        return _repair(row) if row is not None else None

    async def finish_repair(
        self, sandbox_id: str, holder: UUID, outcome: Reason | None, detail: dict[str, Any] | None
    ) -> bool:
        """Close a repair: ``outcome`` is the transition to log, None when the sandbox was running anyway."""
        figures = orjson.dumps(detail).decode() if detail is not None else None
        logged = outcome.value if outcome is not None else "running"
        return bool(await self._val("finish_repair", sandbox_id, holder, logged, figures))

    async def delay_repair(self, sandbox_id: str, holder: UUID, seconds: float) -> None:
        await self._exec("delay_repair", sandbox_id, holder, seconds)

    async def pending_repairs(self) -> int:
        return int(await self._val("pending_repairs"))

"""Ingest's statements: a batch of events applied in one transaction, and its replica's heartbeat."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime
from typing import TYPE_CHECKING, Any

import orjson

from consumer.state import Applied, Delta, Session, Transition
from consumer.store.base import StoreBase
from consumer.store.records import BatchOutcome, session_of
from consumer.store.sql import queries

if TYPE_CHECKING:
    from consumer.store.base import Connection

Decide = Callable[[Session | None, Delta], Applied]


def _columns(sessions: list[Session], *, for_update: bool) -> list[list[Any]]:
    columns: list[list[Any]] = [
        [s.sandbox_id for s in sessions],
        [s.project_id for s in sessions],
        [s.user_id for s in sessions],
        [s.template for s in sessions],
        [s.idle_timeout_s for s in sessions],
        [s.metadata for s in sessions],
        [s.created_event_id for s in sessions],
        [s.created_event_at for s in sessions],
        [s.state.value for s in sessions],
        [s.last_activity for s in sessions],
        [s.pause_due_at for s in sessions],
        [s.killed_at for s in sessions],
        [s.last_arrived_at for s in sessions],
    ]
    if for_update:
        columns.append([s.resume_requested_at for s in sessions])
        columns.append([s.dry_run_at for s in sessions])
    return columns


async def _log_transitions(conn: Connection, transitions: Iterable[Transition], actor: str) -> None:
    """Append transitions to the log, on a connection whose transaction made them."""
    items = list(transitions)
    if not items:
        return
    await conn.execute(
        queries()["insert_transitions"],
        [t.sandbox_id for t in items],
        [t.from_state.value if t.from_state else None for t in items],
        [t.to_state.value for t in items],
        [t.reason.value for t in items],
        [actor] * len(items),
        [t.generation for t in items],
        [orjson.dumps(t.detail).decode() if t.detail is not None else None for t in items],
    )


class IngestStatements(StoreBase):
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
                current = {
                    r["sandbox_id"]: session_of(r) for r in await conn.fetch(sql["lock_sessions"], ids)
                }
                decided = {sid: decide(current.get(sid), pending[sid]) for sid in ids}
                fresh = [a.session for sid, a in decided.items() if sid not in current]
                changed = [a.session for sid, a in decided.items() if sid in current and a.changed]
                inserted: set[str] = set()
                if fresh:
                    rows = await conn.fetch(sql["insert_sessions"], *_columns(fresh, for_update=False))
                    inserted = {r["sandbox_id"] for r in rows}
                if changed:
                    await conn.execute(sql["update_sessions"], *_columns(changed, for_update=True))
                raced = {s.sandbox_id for s in fresh} - inserted
                for sid, applied in decided.items():
                    if sid not in raced:
                        transitions.extend(applied.transitions)
                        stale += applied.stale_events
                pending = {sid: pending[sid] for sid in raced}
            await _log_transitions(conn, transitions, "ingest")
        return BatchOutcome(len(deltas), tuple(transitions), stale)

    async def beat_ingest(self, replica: str, held: int, held_redelivered: int) -> datetime:
        """Record that an ingest replica is alive and what it holds; return the database's clock."""
        beat: datetime = await self._val("beat_ingest", replica, held, held_redelivered)
        return beat

    async def advance_watermark(self, replica: str, watermark: datetime) -> None:
        await self._exec("advance_watermark", replica, watermark)

    async def forget_ingest(self, replica: str) -> None:
        await self._exec("forget_ingest", replica)

"""What operators read and change: sessions, history, ticks, usage, keep-alives and resumes."""

from __future__ import annotations

from datetime import datetime

from consumer.state import Reason, State
from consumer.store.base import StoreBase
from consumer.store.records import Moved, Prices, SessionRecord, TickRecord, TransitionRecord


class OperatorStatements(StoreBase):
    async def get_session(self, sandbox_id: str) -> SessionRecord | None:
        row = await self._row("get_session", sandbox_id)
        return SessionRecord.of(row) if row is not None else None

    async def transitions_of(self, sandbox_id: str) -> list[TransitionRecord]:
        """A sandbox's history, oldest first."""
        return [TransitionRecord.of(r) for r in await self._rows("session_transitions", sandbox_id)]

    async def list_sessions(
        self,
        *,
        project: str | None = None,
        user: str | None = None,
        state: State | None = None,
        idle_longer_than: float | None = None,
        limit: int = 100,
    ) -> list[SessionRecord]:
        """Sessions matching every filter given, least recently active first."""
        rows = await self._rows(
            "list_sessions", project, user, state.value if state else None, idle_longer_than, limit
        )
        return [SessionRecord.of(r) for r in rows]

    async def count_by_state(self) -> dict[State, int]:
        counts = dict.fromkeys(State, 0)
        counts.update({State(r["state"]): r["n"] for r in await self._rows("count_by_state")})
        return counts

    async def last_tick(self) -> TickRecord | None:
        row = await self._row("last_tick")
        return TickRecord.of(row) if row is not None else None

    async def transitions_since(self, seconds: float) -> dict[tuple[State, Reason], int]:
        """How many transitions went to each (state, reason) in the last ``seconds``."""
        rows = await self._rows("transitions_since", seconds)
        return {(State(r["to_state"]), Reason(r["reason"])): r["n"] for r in rows}

    async def paused_usage(self, prices: Prices) -> tuple[float, float]:
        """(seconds sandboxes spent paused, USD they would have cost running, by their sizes)."""
        row = await self._one(
            "paused_usage",
            prices.default_cpu_count,
            prices.default_memory_mb,
            prices.per_vcpu_second,
            prices.per_gib_second,
        )
        return float(row["seconds"]), float(row["usd"])

    async def keep_alive(self, sandbox_id: str, until: datetime) -> State | None:
        """Never pause before ``until``; the row's state (None: no such row)."""
        state: str | None = await self._val("keep_alive", sandbox_id, until)
        return State(state) if state is not None else None

    async def applied_migrations(self) -> list[int] | None:
        """The migration versions applied to the schema; None when it has no autopause tables."""
        if not await self._val("schema_migrated", self.schema):
            return None
        return [r["version"] for r in await self._rows("applied_migrations")]

    async def resume_by_operator(self, sandbox_id: str, generation: int, default_timeout_s: float) -> Moved:
        """PAUSED -> RUNNING after an operator's resume, if the row is still the one read before it."""
        row = await self._row("resume_by_operator", sandbox_id, generation, default_timeout_s)
        if row is None:
            return Moved(False, None)
        return Moved(bool(row["moved"]), State(row["state"]), row["pause_due_at"])

    async def gone_by_operator(self, sandbox_id: str, generation: int) -> Moved:
        """PAUSED -> KILLED (gone) when E2B no longer has the sandbox an operator resumed."""
        row = await self._row("gone_by_operator", sandbox_id, generation)
        if row is None:
            return Moved(False, None)
        return Moved(bool(row["moved"]), State(row["state"]))

"""The Postgres store: runs the named statements of ``sql/queries.sql`` and returns typed rows.

Errors are translated here. PostgreSQL refusing a value for its data (a data
exception or a constraint) is :class:`~consumer.errors.StoreRejected`: retrying
the same statement cannot help. Everything else the driver raises (the server
gone or restarting, a read-only standby after a failover, a full disk, a
cancelled statement) is :class:`~consumer.errors.StoreUnavailable`: the roles
hold their work and retry, they never exit and never reject valid input.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any, Protocol
from uuid import UUID

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
# PostgreSQL refusing the data itself: retrying the same statement cannot help.
REJECTED = (asyncpg.exceptions.DataError, asyncpg.exceptions.IntegrityConstraintViolationError)


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
class TickStart:
    leased: bool  # no other replica is mid-tick
    started: bool  # and no replica ran this scheduled time yet


@dataclass(frozen=True)
class Probe:
    """What every tick reads first."""

    now: datetime  # the database's clock
    first_due: datetime | None  # the first deadline of a RUNNING row
    renewed: list[Claim]  # claims whose lease ran out, renewed: send their commands again


@dataclass(frozen=True)
class Attempt:
    """The compare-and-set before an E2B call: ``taken``, or why not."""

    taken: bool
    backed: bool  # the row still backs the command (when not taken: another attempt holds it)
    claimed_activity: datetime | None = None
    held_for: float = 0.0  # seconds the other attempt still holds the row
    idle_timeout_s: int | None = None


@dataclass(frozen=True)
class Backing:
    """Whether a row backs its pause command, and E2B's end of life for it as last listed."""

    backed: bool
    end_at: datetime | None = None
    seen_at: datetime | None = None


@dataclass(frozen=True)
class PauseEnd:
    """What the worker writes when a pause attempt ends, and how the row is to move."""

    to_state: State
    reason: str
    attempts: int
    error: str | None = None
    retry_after: datetime | None = None
    due_at: datetime | None = None
    dry_run_at: datetime | None = None
    end_at: datetime | None = None
    lifetime_left_s: float | None = None
    check_e2b_later: bool = False


@dataclass(frozen=True)
class PauseFinished:
    """The outcome of the closing compare-and-set: did the row move, and where is it now."""

    moved: bool
    state: State | None


@dataclass(frozen=True)
class Repair:
    """A row whose sandbox may have been paused while in use."""

    sandbox_id: str
    last_activity: datetime
    claimed_activity: datetime | None
    lifetime_left_s: float | None


@dataclass(frozen=True)
class ReplicaBeat:
    """One ingest replica as the scheduler sees it."""

    replica: str
    beat_at: datetime
    held: int
    held_redelivered: int
    watermark: datetime | None


@dataclass(frozen=True)
class Prices:
    """What a running sandbox costs, by its size (E2B bills vCPU-seconds and GiB-seconds)."""

    per_vcpu_second: float
    per_gib_second: float
    default_cpu_count: int
    default_memory_mb: int


class SandboxFacts(Protocol):
    """What E2B's listing says of a sandbox, as reconcile writes it."""

    @property
    def sandbox_id(self) -> str: ...
    @property
    def cpu_count(self) -> int | None: ...
    @property
    def memory_mb(self) -> int | None: ...
    @property
    def end_at(self) -> datetime | None: ...
    @property
    def metadata(self) -> tuple[tuple[str, str], ...]: ...


@dataclass(frozen=True)
class LiveRow:
    """A RUNNING, PAUSING or PAUSED row as reconcile compares it with E2B's listing."""

    sandbox_id: str
    state: State
    listed: bool  # E2B's listing has its sandbox
    settled: bool  # unchanged since the listing started, no pause call or repair under way


@dataclass(frozen=True)
class IngestView:
    """The database's clock and every ingest replica's row, read together."""

    now: datetime
    replicas: tuple[ReplicaBeat, ...]


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
        metadata=row["metadata"] or "{}",
        created_event_id=row["created_event_id"],
        created_event_at=row["created_event_at"],
        generation=row["generation"],
        claimed_activity=row["claimed_activity"],
        paused_at=row["paused_at"],
        killed_at=row["killed_at"],
        keep_alive_until=row["keep_alive_until"],
        retry_after=row["retry_after"],
        last_arrived_at=row["last_arrived_at"],
        resume_requested_at=row["resume_requested_at"],
        attempt_id=row["attempt_id"],
        dry_run_at=row["dry_run_at"],
    )


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
        except REJECTED as exc:
            raise StoreRejected(f"PostgreSQL refused the data: {type(exc).__name__}: {exc}") from exc
        except asyncpg.exceptions.PostgresError as exc:
            raise StoreUnavailable(f"PostgreSQL failed: {type(exc).__name__}: {exc}") from exc

    async def _val(self, name: str, *args: Any) -> Any:
        async with self._conn() as conn:
            return await conn.fetchval(queries()[name], *args)

    async def _row(self, name: str, *args: Any) -> asyncpg.Record | None:
        async with self._conn() as conn:
            return await conn.fetchrow(queries()[name], *args)

    async def _rows(self, name: str, *args: Any) -> list[asyncpg.Record]:
        async with self._conn() as conn:
            return list(await conn.fetch(queries()[name], *args))

    async def _exec(self, name: str, *args: Any) -> str:
        """Run a statement; its status, e.g. ``UPDATE 3``."""
        async with self._conn() as conn:
            status: str = await conn.execute(queries()[name], *args)
        return status

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
            [orjson.dumps(t.detail).decode() if t.detail is not None else None for t in items],
        )

    async def beat_ingest(self, replica: str, held: int, held_redelivered: int) -> datetime:
        """Record that an ingest replica is alive and what it holds; return the database's clock."""
        beat: datetime = await self._val("beat_ingest", replica, held, held_redelivered)
        return beat

    async def advance_watermark(self, replica: str, watermark: datetime) -> None:
        await self._exec("advance_watermark", replica, watermark)

    async def forget_ingest(self, replica: str) -> None:
        await self._exec("forget_ingest", replica)

    # scheduler

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
        row = await self._row("begin_tick", lease, tick_at, replica, lease_s)
        assert row is not None
        if row["leased"] and not row["started"]:
            await self._exec("release_lease", lease, replica)
        return TickStart(leased=row["leased"], started=row["started"])

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

    async def running_count(self) -> int:
        return int(await self._val("running_count"))

    async def prune_ticks(self) -> None:
        await self._exec("prune_ticks")

    async def claim_idle(self, limit: int, until: datetime) -> list[Claim]:
        """Move up to ``limit`` RUNNING rows due by ``until`` (and now) to PAUSING; commit; return them."""
        rows = await self._rows("claim_idle", limit, until)
        return [Claim(r["sandbox_id"], r["generation"]) for r in rows]

    async def release_claims(self, claims: Sequence[Claim], reason: str) -> int:
        """Return claims whose commands never went out to RUNNING, with their old deadline."""
        if not claims:
            return 0
        ids, generations = [c.sandbox_id for c in claims], [c.generation for c in claims]
        return int(await self._val("release_claims", ids, generations, reason))

    async def unpark_dry_run(self, default_timeout_s: float, limit: int) -> int:
        """Make rows a dry run parked due again; the number moved."""
        status = await self._exec("unpark_dry_run", default_timeout_s, limit)
        return int(status.split()[-1])

    async def ingest_view(self) -> IngestView:
        rows = await self._rows("ingest_replicas")
        beats = tuple(
            ReplicaBeat(r["replica"], r["beat_at"], r["held"], r["held_redelivered"], r["watermark"])
            for r in rows
            if r["replica"] is not None
        )
        return IngestView(rows[0]["now"], beats)

    async def retire_ingest(self, silent_for_s: float) -> None:
        await self._exec("retire_ingest", silent_for_s)

    async def make_due(self, sandbox_id: str) -> str | None:
        """Make a RUNNING row due for a pause now; the row's state (None: no such row)."""
        state: str | None = await self._val("make_due", sandbox_id)
        return state

    async def renew_leases_and_probe(self, lease_s: float, limit: int) -> Probe:
        """The first batch of expired claims, renewed, and the first deadline of a RUNNING row."""
        row = await self._row("renew_leases_and_probe", lease_s, limit)
        assert row is not None
        renewed = [Claim(i, g) for i, g in zip(row["sandbox_ids"], row["generations"], strict=True)]
        return Probe(now=row["now"], first_due=row["due"], renewed=renewed)

    async def renew_expired_leases(self, lease_s: float, limit: int) -> list[Claim]:
        rows = await self._rows("renew_expired_leases", lease_s, limit)
        return [Claim(r["sandbox_id"], r["generation"]) for r in rows]

    async def expire_paused(self, days: float, limit: int) -> int:
        return int(await self._val("expire_paused", days, limit))

    # worker

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
            [e.reason for _, _, e in ends],
        )
        return [PauseFinished(bool(r["moved"]), State(r["state"]) if r["state"] else None) for r in rows]

    async def take_repairs(self, holder: UUID, hold_s: float, limit: int) -> list[Repair]:
        rows = await self._rows("take_repairs", holder, hold_s, limit)
        return [_repair(r) for r in rows]

    async def take_own_repair(self, sandbox_id: str, attempt_id: UUID, hold_s: float) -> Repair | None:
        row = await self._row("take_own_repair", sandbox_id, attempt_id, hold_s)
        return _repair(row) if row is not None else None

    async def finish_repair(
        self, sandbox_id: str, holder: UUID, outcome: str, detail: dict[str, Any] | None
    ) -> bool:
        figures = orjson.dumps(detail).decode() if detail is not None else None
        return bool(await self._val("finish_repair", sandbox_id, holder, outcome, figures))

    async def delay_repair(self, sandbox_id: str, holder: UUID, seconds: float) -> None:
        await self._exec("delay_repair", sandbox_id, holder, seconds)

    async def pending_repairs(self) -> int:
        return int(await self._val("pending_repairs"))

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

    async def paused_usage(self, prices: Prices) -> tuple[float, float]:
        """(seconds sandboxes spent paused, USD they would have cost running, by their sizes)."""
        row = await self._row(
            "paused_usage",
            prices.default_cpu_count,
            prices.default_memory_mb,
            prices.per_vcpu_second,
            prices.per_gib_second,
        )
        assert row is not None
        return float(row["seconds"]), float(row["usd"])

    # reconcile

    async def db_now(self) -> datetime:
        now: datetime = await self._val("db_now")
        return now

    async def start_reconcile(self, run_at: datetime, replica: str) -> bool:
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

    # operator commands that must not change the schema, and operator resumes

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


@dataclass(frozen=True)
class Moved:
    """An operator's compare-and-set: did the row move, where it is now, and its new deadline."""

    moved: bool
    state: State | None
    pause_due_at: datetime | None = None


def _repair(row: asyncpg.Record) -> Repair:
    return Repair(row["sandbox_id"], row["last_activity"], row["claimed_activity"], row["lifetime_left_s"])

"""What the store returns and takes: the project's own types, never driver rows."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol
from uuid import UUID

import orjson

from consumer.state import Reason, Session, State, Transition


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
    reason: Reason
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


@dataclass(frozen=True)
class Moved:
    """An operator's compare-and-set: did the row move, where it is now, and its new deadline."""

    moved: bool
    state: State | None
    pause_due_at: datetime | None = None


@dataclass(frozen=True)
class SessionRecord:
    """A whole ``sandbox_sessions`` row, as operators and tests read it."""

    sandbox_id: str
    project_id: str | None
    user_id: str | None
    template: str | None
    idle_timeout_s: int | None
    metadata: dict[str, Any]
    created_event_id: UUID | None
    created_event_at: datetime | None
    state: State
    last_activity: datetime
    pause_due_at: datetime
    generation: int
    claimed_activity: datetime | None
    claimed_at: datetime | None
    paused_at: datetime | None
    killed_at: datetime | None
    expired_at: datetime | None
    keep_alive_until: datetime | None
    retry_after: datetime | None
    pause_attempts: int
    last_error: str | None
    created_at: datetime
    updated_at: datetime
    attempt_id: UUID | None
    attempt_until: datetime | None
    e2b_end_at: datetime | None
    lifetime_left_s: float | None
    resume_requested_at: datetime | None
    last_arrived_at: datetime
    dry_run_at: datetime | None
    cpu_count: int | None
    memory_mb: int | None
    e2b_seen_at: datetime | None

    @classmethod
    def of(cls, row: Any) -> SessionRecord:
        """From a ``SELECT *`` row; a column this class does not know fails here, loudly."""
        values = dict(row)
        values["state"] = State(values["state"])
        values["metadata"] = orjson.loads(values["metadata"] or "{}")
        return cls(**values)


@dataclass(frozen=True)
class TransitionRecord:
    """One line of a sandbox's history."""

    from_state: State | None
    to_state: State
    reason: Reason
    actor: str
    generation: int
    at: datetime
    detail: dict[str, Any] | None

    @classmethod
    def of(cls, row: Any) -> TransitionRecord:
        return cls(
            from_state=State(row["from_state"]) if row["from_state"] else None,
            to_state=State(row["to_state"]),
            reason=Reason(row["reason"]),
            actor=row["actor"],
            generation=row["generation"],
            at=row["at"],
            detail=orjson.loads(row["detail"]) if row["detail"] is not None else None,
        )


@dataclass(frozen=True)
class TickRecord:
    """One row of ``scheduler_ticks``: what a tick did, or why it claimed nothing."""

    tick_at: datetime
    replica: str
    started_at: datetime
    finished_at: datetime | None
    claimed: int
    republished: int
    expired: int
    skipped: str | None
    error: str | None
    detail: dict[str, Any] | None

    @classmethod
    def of(cls, row: Any) -> TickRecord:
        values = dict(row)
        values["detail"] = orjson.loads(values["detail"]) if values["detail"] is not None else None
        return cls(**values)

    @property
    def outcome(self) -> str:
        """ok, running, the reason it skipped, or its error."""
        return self.error or self.skipped or ("running" if self.finished_at is None else "ok")


def session_of(row: Any) -> Session:
    """The state machine's view of a locked row."""
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

"""The session state machine, pure: no I/O, no clock, no settings lookups.

Events arrive duplicated and out of order, from several consumers. Each batch
is first *coalesced* per sandbox into a :class:`Delta` (a commutative merge),
then *applied* to the row as it stands. Both steps are idempotent and
commutative, so any permutation of a set of events, with duplicates and split
into any batches, yields the same row. The ingest role only loads rows, calls
:func:`apply`, and writes what it returns.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any
from uuid import UUID

import orjson

from schemas import SandboxActivity, SandboxCreated, SandboxKilled


class State(StrEnum):
    RUNNING = "RUNNING"
    PAUSING = "PAUSING"
    PAUSED = "PAUSED"
    KILLED = "KILLED"
    EXPIRED = "EXPIRED"


TERMINAL = frozenset({State.KILLED, State.EXPIRED})


class Reason(StrEnum):
    """Why a row changed: the ``reason`` of the transitions log, for every actor."""

    # ingest
    CREATED = "created"
    FIRST_ACTIVITY = "first_activity"
    FIRST_SEEN = "first_seen"
    KILLED = "killed"
    ACTIVITY_DURING_PAUSE = "activity_during_pause"
    RESUMED = "resumed"
    # scheduler
    IDLE = "idle"
    PUBLISH_FAILED = "publish_failed"
    RETENTION = "retention"
    # worker
    PAUSED = "paused"
    ALREADY_PAUSED = "already_paused"
    GONE = "gone"
    PAUSE_FAILED = "pause_failed"
    DRY_RUN = "dry_run"
    BUSY_CPU = "busy_cpu"
    PAUSED_IN_USE = "paused_in_use"
    RESUMED_FOR_USE = "resumed_for_use"
    # reconcile
    RESUMED_OUTSIDE = "resumed_outside"
    PAUSED_OUTSIDE = "paused_outside"
    ADOPTED = "adopted"
    # operators
    KEEP_ALIVE = "keep_alive"
    PAUSE_REQUESTED = "pause_requested"
    RESUMED_BY_OPERATOR = "resumed_by_operator"


@dataclass(frozen=True, slots=True)
class Session:
    """One row of ``sandbox_sessions`` as the state machine sees it."""

    sandbox_id: str
    state: State
    last_activity: datetime
    pause_due_at: datetime
    project_id: str | None = None
    user_id: str | None = None
    template: str | None = None
    idle_timeout_s: int | None = None
    metadata: str = "{}"  # JSON text: ingest passes it through, a created event replaces it
    created_event_id: UUID | None = None
    created_event_at: datetime | None = None
    generation: int = 0
    claimed_activity: datetime | None = None
    paused_at: datetime | None = None
    killed_at: datetime | None = None
    keep_alive_until: datetime | None = None
    retry_after: datetime | None = None
    last_arrived_at: datetime | None = None
    resume_requested_at: datetime | None = None
    attempt_id: UUID | None = None
    dry_run_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Transition:
    """A change of state, as written to the transitions log."""

    sandbox_id: str
    from_state: State | None
    to_state: State
    reason: Reason
    generation: int
    detail: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Delta:
    """Everything one batch says about one sandbox, merged."""

    sandbox_id: str
    created: SandboxCreated | None = None
    last_activity: datetime | None = None
    activity_count: int = 0
    killed_at: datetime | None = None


Event = SandboxCreated | SandboxActivity | SandboxKilled


def delta_of(event: Event) -> Delta:
    """The delta that one event stands for."""
    if isinstance(event, SandboxCreated):
        return Delta(event.sandbox_id, created=event, last_activity=event.occurred_at)
    if isinstance(event, SandboxActivity):
        return Delta(event.sandbox_id, last_activity=event.occurred_at, activity_count=1)
    return Delta(event.sandbox_id, last_activity=event.occurred_at, killed_at=event.occurred_at)


def coalesce(events: list[Event]) -> dict[str, Delta]:
    """Merge a batch of events into one delta per sandbox (duplicates collapse by event id).

    Per sandbox: the earliest created event (by time, then event id), the
    latest time of any event, the number of activity events and the earliest
    kill. Any order of the same events gives the same deltas; the tests hold
    this to a pairwise merge of :func:`delta_of` of each event. Accumulated in
    place because it runs for every event ingested.
    """
    seen: set[UUID] = set()
    merged: dict[str, list[Any]] = {}  # sandbox -> [created, last_activity, activity_count, killed_at]
    for event in events:
        if event.event_id in seen:
            continue
        seen.add(event.event_id)
        acc = merged.get(event.sandbox_id)
        if acc is None:
            acc = merged[event.sandbox_id] = [None, event.occurred_at, 0, None]
        elif event.occurred_at > acc[1]:
            acc[1] = event.occurred_at
        if isinstance(event, SandboxActivity):
            acc[2] += 1
        elif isinstance(event, SandboxCreated):
            acc[0] = _earliest_created(acc[0], event)
        else:
            acc[3] = _min(acc[3], event.occurred_at)
    return {sid: Delta(sid, *acc) for sid, acc in merged.items()}


@dataclass(frozen=True)
class Applied:
    """What :func:`apply` decided for one sandbox."""

    session: Session
    transitions: tuple[Transition, ...]
    stale_events: int
    changed: bool


def pause_due(
    last_activity: datetime,
    last_arrived_at: datetime | None,
    timeout: timedelta,
    keep_alive_until: datetime | None,
    retry_after: datetime | None,
) -> datetime:
    """When a RUNNING session becomes eligible for a pause.

    The idle timeout runs from the newest activity by its stamp *and* from the
    arrival of the newest event, whichever is later: a producer whose clock
    lags cannot make a sandbox whose events keep arriving look idle.
    """
    due = last_activity + timeout
    for later in (
        last_arrived_at + timeout if last_arrived_at is not None else None,
        keep_alive_until,
        retry_after,
    ):
        if later is not None and later > due:
            due = later
    return due


def _deadline_changes(
    current: Session,
    changes: dict[str, Any],
    moved: bool,
    new_state: State | None,
    default_timeout: timedelta,
) -> dict[str, Any]:
    """The deadline fields ``changes`` (to ``current``) call for.

    A deadline that the worker or the CLI pushed out (dry run, retry-after,
    keep-alive) stays until newer activity, a new timeout or a resume moves it.
    """
    timeout_s = changes.get("idle_timeout_s", current.idle_timeout_s)
    if not (moved or timeout_s != current.idle_timeout_s or new_state is State.RUNNING):
        return {}
    timeout = timedelta(seconds=timeout_s) if timeout_s is not None else default_timeout
    last_activity = changes.get("last_activity", current.last_activity)
    last_arrived = changes.get("last_arrived_at", current.last_arrived_at)
    due = pause_due(last_activity, last_arrived, timeout, current.keep_alive_until, current.retry_after)
    deadline: dict[str, Any] = {}
    if due != current.pause_due_at:
        deadline["pause_due_at"] = due
    if current.dry_run_at is not None:
        deadline["dry_run_at"] = None
    return deadline


def apply(current: Session | None, delta: Delta, default_timeout: timedelta, arrived_at: datetime) -> Applied:
    """Apply a coalesced delta that arrived at ``arrived_at`` to a row (or to no row yet).

    The rules are the design's state table. ``arrived_at`` is ingest's clock
    when the batch is written; it counts for created and activity events only.
    """
    transitions: list[Transition] = []
    active = delta.created is not None or delta.activity_count > 0
    born = current is None
    if current is None:
        # every event's time counts as activity: last_activity is the max of them all
        assert delta.last_activity is not None, "a delta always carries a time"
        current = Session(
            sandbox_id=delta.sandbox_id,
            state=State.RUNNING,
            last_activity=delta.last_activity,
            pause_due_at=delta.last_activity + default_timeout,
            last_arrived_at=arrived_at,
        )
        transitions.append(Transition(delta.sandbox_id, None, State.RUNNING, _birth(delta), 0))

    changes: dict[str, Any] = {}
    if delta.created is not None:
        changes.update(_created_fields(current, delta.created))
    if delta.last_activity is not None and delta.last_activity > current.last_activity:
        changes["last_activity"] = delta.last_activity
    if active and (current.last_arrived_at is None or arrived_at > current.last_arrived_at):
        changes["last_arrived_at"] = arrived_at

    new_state, reason = _next_state(current, delta)
    stale = delta.activity_count if current.state in TERMINAL and new_state is None else 0
    if new_state is not None and reason is not None:
        transitions.append(
            Transition(current.sandbox_id, current.state, new_state, reason, current.generation)
        )
        changes["state"] = new_state
        changes["resume_requested_at"] = _resume_request(current, new_state, arrived_at)
    if delta.killed_at is not None:
        killed_at = _min(current.killed_at, delta.killed_at)
        if killed_at != current.killed_at:
            changes["killed_at"] = killed_at

    moved = born or "last_activity" in changes or "last_arrived_at" in changes
    changes.update(_deadline_changes(current, changes, moved, new_state, default_timeout))
    row = _with(current, changes) if changes else current
    return Applied(row, tuple(transitions), stale, changed=bool(changes or transitions))


_SESSION_FIELDS = tuple(f.name for f in dataclasses.fields(Session))
_set = object.__setattr__


def _with(row: Session, changes: dict[str, Any]) -> Session:
    """``dataclasses.replace`` without its checks (the changes are fields): it runs per row ingested."""
    new = object.__new__(Session)
    for name in _SESSION_FIELDS:
        _set(new, name, getattr(row, name))
    for name, value in changes.items():
        _set(new, name, value)
    return new


def _next_state(row: Session, delta: Delta) -> tuple[State | None, Reason | None]:
    """The state a delta moves the row to, with the reason; None when it stays.

    Event times are compared with event times only: any activity after the
    activity the claim saw counts as use, while the pause is pending and after
    it is done (the claim's activity time stays on the row until the next claim).
    """
    if delta.killed_at is not None:
        return (State.KILLED, Reason.KILLED) if row.state is not State.KILLED else (None, None)
    if delta.last_activity is None or row.state in TERMINAL:
        return None, None
    seen_by_claim = row.claimed_activity or row.last_activity
    if row.state is State.PAUSING and (
        row.claimed_activity is None or delta.last_activity > row.claimed_activity
    ):
        return State.RUNNING, Reason.ACTIVITY_DURING_PAUSE
    if row.state is State.PAUSED and delta.last_activity > seen_by_claim:
        return State.RUNNING, Reason.RESUMED
    return None, None


def _resume_request(row: Session, to_state: State, arrived_at: datetime) -> datetime | None:
    """When leaving PAUSING or PAUSED for use, whether a worker must make sure E2B runs the sandbox.

    A PAUSED sandbox may have been paused while in use (the app may not have
    resumed it); a PAUSING one may be, if a pause call had started. A worker
    asks E2B and resumes it when it is paused: asking costs one read, missing
    it leaves a user with a frozen sandbox.
    """
    if to_state is not State.RUNNING:
        return None
    if row.state is State.PAUSED or (row.state is State.PAUSING and row.attempt_id is not None):
        return arrived_at
    return row.resume_requested_at


def _created_fields(row: Session, created: SandboxCreated) -> dict[str, Any]:
    """The descriptive fields to take from ``created``: those of the earliest created event win."""
    if (
        row.created_event_at is not None
        and row.created_event_id is not None
        and _created_key(row.created_event_at, row.created_event_id)
        <= _created_key(created.occurred_at, created.event_id)
    ):
        return {}
    return {
        "project_id": created.project_id,
        "user_id": created.user_id,
        "template": created.template,
        "idle_timeout_s": created.idle_timeout_s,
        "metadata": orjson.dumps(created.metadata).decode(),
        "created_event_id": created.event_id,
        "created_event_at": created.occurred_at,
    }


def _birth(delta: Delta) -> Reason:
    if delta.created is not None:
        return Reason.CREATED
    return Reason.FIRST_ACTIVITY if delta.activity_count else Reason.FIRST_SEEN


def _created_key(at: datetime, event_id: UUID) -> tuple[datetime, str]:
    return at, str(event_id)


def _earliest_created(a: SandboxCreated | None, b: SandboxCreated | None) -> SandboxCreated | None:
    if a is None or b is None:
        return a or b
    return min(a, b, key=lambda c: _created_key(c.occurred_at, c.event_id))


def _min(a: datetime | None, b: datetime | None) -> datetime | None:
    if a is None or b is None:
        return a or b
    return min(a, b)

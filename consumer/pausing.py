"""The worker's decisions, pure: what follows a look at E2B, what the row gets, when to repair.

:func:`decide` is the next step of one claim after an attempt, :func:`pause_end`
what the closing compare-and-set writes for it, and :func:`must_repair` whether
the pause hit a sandbox in use. Each has its table of cases in its docstring,
and a test per row.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from consumer.e2b_adapter import CallOutcome
from consumer.state import Reason, State
from consumer.store import PauseEnd, PauseFinished
from schemas import OutcomeType

# A dry-run claim parks the row until newer activity moves its deadline, or a live scheduler.
PARKED = datetime(9999, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Decision:
    """What to do after a look at E2B (or instead of one)."""

    to_state: State | None  # None: try again after a backoff
    reason: Reason | None
    outcome: OutcomeType | None = None  # announced on sandbox.lifecycle
    retry_after: bool = False  # the row is left alone for ``retry_after`` seconds
    deadline_from_now: bool = False  # the idle timeout starts again now


def decide(
    result: CallOutcome | None, *, attempt: int, max_attempts: int, dry_run: bool, busy: bool
) -> Decision:
    """Pure: the worker's next step for one claim. ``result`` is what E2B's pause said (None: not asked).

    ==========  =====  =================  ===========  ==========================================
    dry run     busy   E2B said           attempt      next
    ==========  =====  =================  ===========  ==========================================
    yes         any    (not asked)        any          RUNNING dry_run, parked; announce paused
    no          yes    (not asked)        any          RUNNING busy_cpu, deadline from now
    no          no     paused             any          PAUSED paused; announce paused
    no          no     already paused     any          PAUSED already_paused; announce paused
    no          no     gone               any          KILLED gone; announce gone
    no          no     retryable          < max        try again after a backoff
    no          no     retryable          = max        RUNNING pause_failed, retry-after; announce
    no          no     failed             any          RUNNING pause_failed, retry-after; announce
    ==========  =====  =================  ===========  ==========================================
    """
    if dry_run:
        return Decision(State.RUNNING, Reason.DRY_RUN, "sandbox.paused")
    if busy:
        return Decision(State.RUNNING, Reason.BUSY_CPU, deadline_from_now=True)
    match result:
        case CallOutcome.PAUSED:
            return Decision(State.PAUSED, Reason.PAUSED, "sandbox.paused")
        case CallOutcome.ALREADY_PAUSED:
            return Decision(State.PAUSED, Reason.ALREADY_PAUSED, "sandbox.paused")
        case CallOutcome.GONE:
            return Decision(State.KILLED, Reason.GONE, "sandbox.gone")
        case CallOutcome.RETRYABLE if attempt < max_attempts:
            return Decision(None, None)
        case _:
            return Decision(State.RUNNING, Reason.PAUSE_FAILED, "sandbox.pause_failed", retry_after=True)


def must_repair(result: CallOutcome | None, finished: PauseFinished) -> bool:
    """Pure: E2B holds the sandbox paused, but activity took its row back to RUNNING meanwhile.

    ============================  ===============================  ======
    E2B said                      closing compare-and-set          repair
    ============================  ===============================  ======
    paused / already paused       row did not move, it is RUNNING  yes
    paused / already paused       moved, or the row is elsewhere   no
    anything else, or not asked   any                              no
    ============================  ===============================  ======
    """
    paused = result in (CallOutcome.PAUSED, CallOutcome.ALREADY_PAUSED)
    return paused and not finished.moved and finished.state is State.RUNNING


def lifetime_left(end_at: datetime | None, read_at: datetime) -> float | None:
    """Seconds of life the sandbox had when E2B was asked, or None when unknown."""
    if end_at is None:
        return None
    return max(0.0, (end_at - read_at).total_seconds())


def pause_end(
    decision: Decision,
    *,
    attempt: int,
    now: datetime,
    idle_timeout_s: float,
    retry_after_s: float,
    error: str | None,
    end_at: datetime | None,
    read_at: datetime,
    called_pause: bool,
) -> PauseEnd:
    """Pure: what the closing compare-and-set writes for a final ``decision``.

    ==================  ===========================================================
    decision            deadline written
    ==================  ===========================================================
    retry_after         ``retry_after`` and the idle deadline both ``now + retry_after_s``
    deadline_from_now   idle deadline ``now + idle_timeout_s`` (the row's own, else the default)
    dry_run             deadline parked (:data:`PARKED`), ``dry_run_at = now``
    otherwise           deadline unchanged
    ==================  ===========================================================

    A pause call that failed may have paused the sandbox all the same (a
    timeout after E2B acted): ``check_e2b_later`` asks a repair to look.
    """
    if decision.to_state is None or decision.reason is None:
        raise ValueError("pause_end needs a final decision, not a retry")
    due_at = retry_after = dry_run_at = None
    if decision.retry_after:
        retry_after = due_at = now + timedelta(seconds=retry_after_s)
    if decision.deadline_from_now:
        due_at = now + timedelta(seconds=idle_timeout_s)
    if decision.reason is Reason.DRY_RUN:
        due_at, dry_run_at = PARKED, now
    return PauseEnd(
        decision.to_state,
        decision.reason,
        attempt,
        error=error,
        retry_after=retry_after,
        due_at=due_at,
        dry_run_at=dry_run_at,
        end_at=end_at,
        lifetime_left_s=lifetime_left(end_at, read_at),
        check_e2b_later=decision.retry_after and called_pause,
    )

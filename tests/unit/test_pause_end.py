"""pause_end: one test per row of its table, what the closing compare-and-set writes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from consumer.e2b_adapter import CallOutcome
from consumer.pausing import PARKED, Decision, decide, pause_end
from consumer.state import Reason, State
from consumer.store import PauseEnd

NOW = datetime(2026, 5, 4, 12, 0, tzinfo=UTC)


def end_of(decision: Decision, *, called_pause: bool = True, end_at: datetime | None = None) -> PauseEnd:
    return pause_end(
        decision,
        attempt=3,
        now=NOW,
        idle_timeout_s=900,
        retry_after_s=300,
        error="boom" if decision.retry_after else None,
        end_at=end_at,
        read_at=NOW - timedelta(seconds=10),
        called_pause=called_pause,
    )


def test_retry_after_moves_the_deadline_and_the_retry_together() -> None:
    end = end_of(decide(CallOutcome.FAILED, attempt=1, max_attempts=5, dry_run=False, busy=False))
    assert (end.to_state, end.reason) == (State.RUNNING, Reason.PAUSE_FAILED)
    assert end.retry_after == end.due_at == NOW + timedelta(seconds=300)
    assert end.error == "boom" and end.attempts == 3 and end.dry_run_at is None
    # a failed pause call may have paused it all the same: a repair looks
    assert end.check_e2b_later is True


def test_retry_after_with_no_pause_call_asks_no_repair() -> None:
    decision = decide(CallOutcome.FAILED, attempt=1, max_attempts=5, dry_run=False, busy=False)
    assert end_of(decision, called_pause=False).check_e2b_later is False


def test_busy_cpu_starts_the_idle_timeout_again_from_now() -> None:
    end = end_of(decide(None, attempt=1, max_attempts=5, dry_run=False, busy=True))
    assert (end.to_state, end.reason) == (State.RUNNING, Reason.BUSY_CPU)
    assert end.due_at == NOW + timedelta(seconds=900) and end.retry_after is None
    assert end.check_e2b_later is False


def test_dry_run_parks_the_deadline() -> None:
    end = end_of(decide(None, attempt=1, max_attempts=5, dry_run=True, busy=False))
    assert (end.to_state, end.reason) == (State.RUNNING, Reason.DRY_RUN)
    assert end.due_at == PARKED and end.dry_run_at == NOW


@pytest.mark.parametrize(
    ("result", "state", "reason"),
    [
        (CallOutcome.PAUSED, State.PAUSED, Reason.PAUSED),
        (CallOutcome.ALREADY_PAUSED, State.PAUSED, Reason.ALREADY_PAUSED),
        (CallOutcome.GONE, State.KILLED, Reason.GONE),
    ],
)
def test_otherwise_the_deadline_is_left_as_it_is(result: CallOutcome, state: State, reason: Reason) -> None:
    end = end_of(decide(result, attempt=1, max_attempts=5, dry_run=False, busy=False), end_at=NOW)
    assert (end.to_state, end.reason) == (state, reason)
    assert end.due_at is None and end.retry_after is None and end.dry_run_at is None
    assert end.lifetime_left_s == 10.0  # E2B's end of life, as it was when read


def test_a_retry_is_not_an_end() -> None:
    decision = decide(CallOutcome.RETRYABLE, attempt=1, max_attempts=5, dry_run=False, busy=False)
    with pytest.raises(ValueError, match="final decision"):
        end_of(decision)

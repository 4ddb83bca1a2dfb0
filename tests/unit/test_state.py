"""The state machine: exhaustive rules and the order-independence property."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from uuid import UUID

from hypothesis import given, settings
from hypothesis import strategies as st

from consumer.state import Delta, Event, Session, State, apply, coalesce, delta_of, pause_due
from schemas import SandboxActivity, SandboxCreated, SandboxKilled

T0 = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
TIMEOUT = timedelta(minutes=10)
# when the events arrive: long after their stamps, so that stamps decide the deadlines below
ARRIVED = T0 - TIMEOUT


def created(sid: str = "sbx-1", at: int = 0, n: int = 1, timeout: int | None = None) -> SandboxCreated:
    return SandboxCreated(
        event_id=UUID(int=n),
        occurred_at=T0 + timedelta(seconds=at),
        sandbox_id=sid,
        project_id=f"p{n}",
        user_id="u1",
        template="base",
        idle_timeout_s=timeout,
    )


def activity(sid: str = "sbx-1", at: int = 0, n: int = 1000) -> SandboxActivity:
    return SandboxActivity(
        event_id=UUID(int=n),
        occurred_at=T0 + timedelta(seconds=at),
        sandbox_id=sid,
        source="terminal",
    )


def killed(sid: str = "sbx-1", at: int = 0, n: int = 5000) -> SandboxKilled:
    return SandboxKilled(event_id=UUID(int=n), occurred_at=T0 + timedelta(seconds=at), sandbox_id=sid)


def run(events: list[Event], row: Session | None = None) -> Session | None:
    for sid, delta in coalesce(events).items():
        assert sid == delta.sandbox_id
        row = apply(row, delta, TIMEOUT, ARRIVED).session
    return row


def test_created_makes_a_running_row_with_its_deadline() -> None:
    row = run([created(at=5, timeout=60)])
    assert row is not None
    assert row.state is State.RUNNING
    assert row.project_id == "p1"
    assert row.pause_due_at == T0 + timedelta(seconds=65)


def test_activity_before_created_is_filled_in_later() -> None:
    row = run([activity(at=30)])
    assert row is not None and row.project_id is None
    row = run([created(at=0)], row)
    assert row is not None
    assert row.project_id == "p1" and row.last_activity == T0 + timedelta(seconds=30)


def test_the_earliest_created_event_wins_whatever_the_order() -> None:
    first, second = created(at=0, n=1), created(at=10, n=2)
    assert run([first, second]) == run([second, first])
    row = run([second])
    assert run([first], row) == run([first, second])


def test_activity_moves_last_activity_forward_only() -> None:
    row = run([activity(at=50), activity(at=20, n=1001)])
    assert row is not None and row.last_activity == T0 + timedelta(seconds=50)


def test_pausing_row_returns_to_running_on_newer_activity_only() -> None:
    row = run([created(at=0)])
    assert row is not None
    pausing = dataclasses.replace(row, state=State.PAUSING, generation=1, claimed_activity=row.last_activity)
    older = apply(pausing, delta_of(activity(at=0)), TIMEOUT, ARRIVED)
    assert older.session.state is State.PAUSING and not older.transitions
    newer = apply(pausing, delta_of(activity(at=1)), TIMEOUT, ARRIVED)
    assert newer.session.state is State.RUNNING
    assert newer.transitions[0].reason == "activity_during_pause"
    assert newer.session.pause_due_at == T0 + timedelta(seconds=1) + TIMEOUT


def test_a_paused_row_resumes_on_any_activity_after_the_one_its_claim_saw() -> None:
    row = run([created(at=0)])
    assert row is not None
    claimed = T0 + timedelta(seconds=50)
    paused = dataclasses.replace(
        row, state=State.PAUSED, claimed_activity=claimed, paused_at=T0 + timedelta(seconds=100)
    )
    assert apply(paused, delta_of(activity(at=49)), TIMEOUT, ARRIVED).session.state is State.PAUSED
    # used during the pause call, before the pause was written: still use, compared in event time
    resumed = apply(paused, delta_of(activity(at=51)), TIMEOUT, ARRIVED)
    assert resumed.session.state is State.RUNNING
    assert resumed.transitions[0].reason == "resumed"
    assert resumed.session.resume_requested_at == ARRIVED


def test_leaving_pausing_asks_for_a_resume_only_once_a_pause_call_may_have_started() -> None:
    row = run([created(at=0)])
    assert row is not None
    pausing = dataclasses.replace(row, state=State.PAUSING, generation=1, claimed_activity=row.last_activity)
    before_call = apply(pausing, delta_of(activity(at=5)), TIMEOUT, ARRIVED).session
    assert before_call.state is State.RUNNING and before_call.resume_requested_at is None
    calling = dataclasses.replace(pausing, attempt_id=UUID(int=7))
    during_call = apply(calling, delta_of(activity(at=5)), TIMEOUT, ARRIVED).session
    assert during_call.state is State.RUNNING and during_call.resume_requested_at == ARRIVED


def test_the_deadline_runs_from_arrival_when_stamps_lag() -> None:
    late = T0 + timedelta(hours=1)  # the producer's clock is an hour behind
    row = apply(None, delta_of(created(at=0)), TIMEOUT, late).session
    assert row.pause_due_at == late + TIMEOUT
    again = apply(row, delta_of(activity(at=1)), TIMEOUT, late + timedelta(minutes=5)).session
    assert again.pause_due_at == late + timedelta(minutes=5) + TIMEOUT
    assert again.last_activity == T0 + timedelta(seconds=1)
    # a kill is not activity: it does not move the arrival
    killed_later = apply(row, delta_of(killed(at=2)), TIMEOUT, late + timedelta(hours=1)).session
    assert killed_later.last_arrived_at == late


def test_terminal_rows_count_activity_as_stale() -> None:
    row = run([created(at=0), killed(at=5)])
    assert row is not None and row.state is State.KILLED
    for terminal in (State.KILLED, State.EXPIRED):
        result = apply(dataclasses.replace(row, state=terminal), delta_of(activity(at=9)), TIMEOUT, ARRIVED)
        assert result.session.state is terminal
        assert result.stale_events == 1


def test_killed_wins_from_any_state() -> None:
    base = run([created(at=0)])
    assert base is not None
    for state in State:
        result = apply(dataclasses.replace(base, state=state), delta_of(killed(at=3)), TIMEOUT, ARRIVED)
        assert result.session.state is State.KILLED


def test_a_pushed_out_deadline_stays_until_newer_activity() -> None:
    row = run([created(at=0)])
    assert row is not None
    parked = dataclasses.replace(row, pause_due_at=T0 + timedelta(days=1))
    assert (
        apply(parked, delta_of(activity(at=0)), TIMEOUT, ARRIVED).session.pause_due_at == parked.pause_due_at
    )
    moved = apply(parked, delta_of(activity(at=60)), TIMEOUT, ARRIVED).session
    assert moved.pause_due_at == T0 + timedelta(seconds=60) + TIMEOUT


def test_keep_alive_retry_after_and_arrival_push_the_deadline() -> None:
    later = T0 + timedelta(hours=2)
    assert pause_due(T0, None, TIMEOUT, later, None) == later
    assert pause_due(T0, None, TIMEOUT, None, later) == later
    assert pause_due(T0, None, TIMEOUT, T0, None) == T0 + TIMEOUT
    assert pause_due(T0, later, TIMEOUT, None, None) == later + TIMEOUT
    assert pause_due(later, T0, TIMEOUT, None, None) == later + TIMEOUT


def merge(a: Delta, b: Delta) -> Delta:
    """The rule coalesce implements, one pair of deltas at a time: the reference it is held to."""
    createds = [c for c in (a.created, b.created) if c is not None]
    kills = [k for k in (a.killed_at, b.killed_at) if k is not None]
    times = [t for t in (a.last_activity, b.last_activity) if t is not None]
    return Delta(
        a.sandbox_id,
        created=min(createds, key=lambda c: (c.occurred_at, str(c.event_id))) if createds else None,
        last_activity=max(times) if times else None,
        activity_count=a.activity_count + b.activity_count,
        killed_at=min(kills) if kills else None,
    )


def folded(events: list[Event]) -> dict[str, Delta]:
    """coalesce's answer, the slow way: merge the delta of each distinct event, in order."""
    deltas: dict[str, Delta] = {}
    seen: set[UUID] = set()
    for event in events:
        if event.event_id in seen:
            continue
        seen.add(event.event_id)
        one = delta_of(event)
        deltas[event.sandbox_id] = merge(deltas[event.sandbox_id], one) if event.sandbox_id in deltas else one
    return deltas


def test_merge_is_commutative() -> None:
    a = delta_of(activity(at=3))
    b = delta_of(created(at=1))
    c = delta_of(killed(at=2))
    assert merge(a, b) == merge(b, a)
    assert merge(merge(a, b), c) == merge(a, merge(b, c))


def test_merge_keeps_the_earliest_created_the_latest_activity_and_the_earliest_kill() -> None:
    first, second = created(at=1, n=1), created(at=4, n=2)
    merged = merge(merge(delta_of(activity(at=3)), delta_of(second)), delta_of(killed(at=2)))
    merged = merge(merge(merged, delta_of(first)), delta_of(killed(at=6, n=5001)))
    assert merged.sandbox_id == "sbx-1"
    assert merged.created == first
    assert merged.last_activity == T0 + timedelta(seconds=6)  # a kill's stamp is the latest seen
    assert merged.activity_count == 1
    assert merged.killed_at == T0 + timedelta(seconds=2)
    assert merged == coalesce([activity(at=3), second, killed(at=2), first, killed(at=6, n=5001)])["sbx-1"]


SANDBOXES = ["sbx-a", "sbx-b", "sbx-c"]


@st.composite
def event_sets(draw: st.DrawFn) -> list[Event]:
    events: list[Event] = []
    for n in range(draw(st.integers(1, 14))):
        sid = draw(st.sampled_from(SANDBOXES))
        at = draw(st.integers(0, 600))
        kind = draw(st.sampled_from(["created", "activity", "activity", "activity", "killed"]))
        if kind == "created":
            events.append(created(sid=sid, at=at, n=n + 1))
        elif kind == "activity":
            events.append(activity(sid=sid, at=at, n=n + 1))
        else:
            events.append(killed(sid=sid, at=at, n=n + 1))
    return events


def replay(events: list[Event], batch_sizes: list[int], start: dict[str, Session]) -> dict[str, Session]:
    rows = dict(start)
    i = 0
    sizes = iter(batch_sizes)
    while i < len(events):
        size = next(sizes, len(events))
        for sid, delta in coalesce(events[i : i + size]).items():
            rows[sid] = apply(rows.get(sid), delta, TIMEOUT, ARRIVED).session
        i += size
    return rows


@st.composite
def starting_rows(draw: st.DrawFn) -> dict[str, Session]:
    """Rows as the scheduler and worker may have left them before the events land."""
    rows = {}
    for sid in SANDBOXES:
        if not draw(st.booleans()):
            continue
        state = draw(st.sampled_from(list(State)))
        at = T0 + timedelta(seconds=draw(st.integers(0, 600)))
        rows[sid] = Session(
            sandbox_id=sid,
            state=state,
            last_activity=at,
            pause_due_at=at + TIMEOUT,
            generation=1,
            claimed_activity=at if state is State.PAUSING else None,
            paused_at=at + timedelta(seconds=1) if state is State.PAUSED else None,
        )
    return rows


@settings(max_examples=400, deadline=None)
@given(
    events=event_sets(),
    data=st.data(),
    start=starting_rows(),
)
def test_any_permutation_with_duplicates_in_any_batches_gives_the_same_rows(
    events: list[Event], data: st.DataObject, start: dict[str, Session]
) -> None:
    reference = replay(events, [len(events)], start)
    shuffled = data.draw(st.permutations(events + data.draw(st.lists(st.sampled_from(events)))))
    batches = data.draw(st.lists(st.integers(1, 5), max_size=20))
    assert replay(shuffled, batches, start) == reference


@settings(max_examples=300, deadline=None)
@given(events=event_sets(), data=st.data())
def test_coalesce_is_the_pairwise_merge_of_each_distinct_event(
    events: list[Event], data: st.DataObject
) -> None:
    shuffled = data.draw(st.permutations(events + data.draw(st.lists(st.sampled_from(events)))))
    assert coalesce(shuffled) == folded(shuffled) == folded(events)

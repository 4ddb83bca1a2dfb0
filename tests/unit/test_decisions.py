"""Pure decisions: cron math, the storm breaker, retries, the token bucket, acks, the gate. No waiting."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from consumer.broker import QueueState, ack_plan
from consumer.busy import is_busy
from consumer.e2b_adapter import CallOutcome, CpuSample, SandboxView
from consumer.errors import ConfigError
from consumer.pausing import decide, must_repair
from consumer.ratelimit import TokenBucket
from consumer.reconcile import plan
from consumer.repairs import resume_lifetime
from consumer.scheduler import claim_budget, freshness_gate, scheduled_time
from consumer.state import Reason, State
from consumer.store import IngestView, LiveRow, PauseFinished, ReplicaBeat
from consumer.timing import backoff_delay, next_ticks, parse_duration, validate_cron

T = datetime(2026, 3, 14, 15, 9, 26, tzinfo=UTC)


def test_default_spec_ticks_every_minute_on_the_minute() -> None:
    assert next_ticks("* * * * *", T, 3) == [
        datetime(2026, 3, 14, 15, 10, tzinfo=UTC),
        datetime(2026, 3, 14, 15, 11, tzinfo=UTC),
        datetime(2026, 3, 14, 15, 12, tzinfo=UTC),
    ]


def test_the_reference_six_field_spec_ticks_every_five_minutes() -> None:
    assert next_ticks("0 */5 * * * *", T, 3) == [
        datetime(2026, 3, 14, 15, 10, tzinfo=UTC),
        datetime(2026, 3, 14, 15, 15, tzinfo=UTC),
        datetime(2026, 3, 14, 15, 20, tzinfo=UTC),
    ]


@pytest.mark.parametrize("spec", ["", "* * *", "61 * * * *", "* * * * * * *", "every minute"])
def test_bad_cron_specs_are_refused(spec: str) -> None:
    with pytest.raises(ConfigError):
        validate_cron(spec)


def test_a_late_wake_up_belongs_to_the_fire_time_it_follows() -> None:
    fire = datetime(2026, 3, 14, 15, 10, tzinfo=UTC)
    assert scheduled_time("* * * * *", fire + timedelta(milliseconds=700)) == fire
    assert scheduled_time("0 */5 * * * *", fire + timedelta(seconds=2)) == fire
    assert scheduled_time("* * * * * *", fire + timedelta(milliseconds=300)) == fire


def test_storm_breaker_takes_a_share_with_a_floor_and_a_cap() -> None:
    assert claim_budget(1_000_000, 0.1, 10_000, 10) == 10_000
    assert claim_budget(50_000, 0.1, 10_000, 10) == 5_000
    assert claim_budget(30, 0.1, 10_000, 10) == 10
    assert claim_budget(3, 0.1, 10_000, 10) == 3
    assert claim_budget(0, 0.1, 10_000, 10) == 0


def test_backoff_grows_with_jitter_and_stays_under_the_cap() -> None:
    rng = random.Random(4)
    for attempt in range(1, 12):
        delay = backoff_delay(attempt, 0.5, 30, rng)
        full = min(30, 0.5 * 2 ** (attempt - 1))
        assert full / 2 <= delay <= full


DECISIONS = [
    # one row per row of decide's table: (dry run, busy, E2B said, attempt) -> next
    (True, False, None, 1, (State.RUNNING, Reason.DRY_RUN, "sandbox.paused", False, False)),
    (True, True, None, 1, (State.RUNNING, Reason.DRY_RUN, "sandbox.paused", False, False)),
    (False, True, None, 1, (State.RUNNING, Reason.BUSY_CPU, None, False, True)),
    (False, False, CallOutcome.PAUSED, 1, (State.PAUSED, Reason.PAUSED, "sandbox.paused", False, False)),
    (
        False,
        False,
        CallOutcome.ALREADY_PAUSED,
        3,
        (State.PAUSED, Reason.ALREADY_PAUSED, "sandbox.paused", False, False),
    ),
    (False, False, CallOutcome.GONE, 1, (State.KILLED, Reason.GONE, "sandbox.gone", False, False)),
    (False, False, CallOutcome.RETRYABLE, 1, (None, None, None, False, False)),
    (False, False, CallOutcome.RETRYABLE, 4, (None, None, None, False, False)),
    (
        False,
        False,
        CallOutcome.RETRYABLE,
        5,
        (State.RUNNING, Reason.PAUSE_FAILED, "sandbox.pause_failed", True, False),
    ),
    (
        False,
        False,
        CallOutcome.FAILED,
        1,
        (State.RUNNING, Reason.PAUSE_FAILED, "sandbox.pause_failed", True, False),
    ),
]


@pytest.mark.parametrize(("dry_run", "busy", "said", "attempt", "expected"), DECISIONS)
def test_the_worker_decides_each_next_step_by_its_table(
    dry_run: bool, busy: bool, said: CallOutcome | None, attempt: int, expected: tuple[object, ...]
) -> None:
    decision = decide(said, attempt=attempt, max_attempts=5, dry_run=dry_run, busy=busy)
    got = (
        decision.to_state,
        decision.reason,
        decision.outcome,
        decision.retry_after,
        decision.deadline_from_now,
    )
    assert got == expected


REPAIRS = [
    # (E2B said, the closing compare-and-set) -> resume the sandbox at once?
    (CallOutcome.PAUSED, PauseFinished(False, State.RUNNING), True),  # activity during the call
    (CallOutcome.ALREADY_PAUSED, PauseFinished(False, State.RUNNING), True),
    (CallOutcome.PAUSED, PauseFinished(True, None), False),  # the pause stood
    (CallOutcome.PAUSED, PauseFinished(False, State.PAUSED), False),  # a copy finished it
    (CallOutcome.PAUSED, PauseFinished(False, State.KILLED), False),
    (CallOutcome.RETRYABLE, PauseFinished(False, State.RUNNING), False),  # never paused
    (None, PauseFinished(False, State.RUNNING), False),  # dry run or busy: E2B not asked
]


@pytest.mark.parametrize(("said", "finished", "repair"), REPAIRS)
def test_a_pause_that_raced_with_activity_is_repaired(
    said: CallOutcome | None, finished: PauseFinished, repair: bool
) -> None:
    assert must_repair(said, finished) is repair


def test_a_resumed_sandbox_lives_at_least_as_long_as_it_had_left() -> None:
    assert resume_lifetime(300.0, None, T, 3600) == 300.0
    assert resume_lifetime(300.0, T + timedelta(seconds=900), T, 3600) == 900.0  # extended since
    assert resume_lifetime(None, T + timedelta(seconds=60), T, 3600) == 60.0
    assert resume_lifetime(None, None, T, 3600) == 3600


def test_token_bucket_spends_its_burst_then_waits_at_the_rate() -> None:
    clock = [100.0]
    bucket = TokenBucket(rate=10, capacity=2, clock=lambda: clock[0])
    assert bucket.wait_time() == 0
    bucket.tokens -= 2
    assert bucket.wait_time() == pytest.approx(0.1)
    clock[0] += 0.05
    assert bucket.wait_time() == pytest.approx(0.05)
    clock[0] += 10
    bucket.wait_time()
    assert bucket.tokens == 2


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90), ("90s", 90), ("15m", 900), ("2h", 7200), ("1h30m", 5400), ("7d", 604800)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "abc", "5x", "m5", "0"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_duration(text)


async def test_a_tick_never_starts_while_the_previous_one_runs() -> None:
    from typing import Any

    from consumer import metrics
    from consumer.health import Health
    from consumer.scheduler import Scheduler
    from consumer.settings import load_settings

    nothing: Any = None
    scheduler = Scheduler(load_settings(), nothing, nothing, Health())
    overlaps = metrics.TICKS.labels("overlap")
    before = overlaps._value.get()
    async with scheduler.running:
        scheduler._fire()
    assert scheduler.current is None
    assert overlaps._value.get() == before + 1


# acks: a multiple-ack never reaches past a delivery still in hand

ACK_CASES = [
    # (outstanding, settling) -> (multiple-ack up to, single acks)
    ({1, 2, 3}, {1, 2, 3}, (3, [])),
    ({1, 2, 3}, {2, 3}, (None, [2, 3])),  # 1 is held: nothing may cover it
    ({1, 2, 3, 4, 5}, {1, 2, 4, 5}, (2, [4, 5])),
    ({1, 2, 3}, {1}, (None, [1])),
    ({7}, {7}, (None, [7])),
    ({1, 2, 3}, set(), (None, [])),
]


@pytest.mark.parametrize(("outstanding", "settling", "plan"), ACK_CASES)
def test_an_ack_plan_never_covers_a_delivery_in_hand(
    outstanding: set[int], settling: set[int], plan: tuple[int | None, list[int]]
) -> None:
    assert ack_plan(outstanding, settling) == plan
    multiple, singles = plan
    acked = {t for t in outstanding if multiple is not None and t <= multiple} | set(singles)
    assert acked == settling


# the freshness gate: claims only what ingest can vouch for

NOW = T
FRESH = NOW - timedelta(seconds=1)
MARK = NOW - timedelta(seconds=3)


def beat(
    name: str = "a",
    *,
    at: datetime = FRESH,
    mark: datetime | None = MARK,
    held: int = 0,
    redelivered: int = 0,
) -> ReplicaBeat:
    return ReplicaBeat(name, at, held, redelivered, mark)


GATE_CASES = [
    # (replicas, ready, consumers) -> (claim until, skipped)
    ([beat()], 0, 1, (MARK, None)),
    ([], 0, 0, (None, "ingest_stale")),  # no ingest at all
    ([beat()], 0, 0, (None, "ingest_stale")),  # a row, but nobody consumes
    ([beat(at=NOW - timedelta(seconds=30))], 0, 1, (None, "ingest_stale")),  # silent
    ([beat()], 0, 2, (None, "ingest_stale")),  # a consumer that does not beat
    ([beat(mark=None)], 0, 1, (None, "ingest_stale")),  # nothing committed yet
    ([beat(mark=NOW - timedelta(minutes=5))], 0, 1, (None, "ingest_stale")),  # stuck
    ([beat(redelivered=1)], 0, 1, (None, "ingest_stale")),  # redelivered events in hand
    ([beat(held=60)], 50, 1, (None, "backlog")),
    # a silent replica not yet retired holds the watermark back to its own
    (
        [beat(), beat("b", at=NOW - timedelta(seconds=30), mark=NOW - timedelta(seconds=20))],
        0,
        1,
        (NOW - timedelta(seconds=20), None),
    ),
    ([beat(), beat("b", mark=NOW - timedelta(seconds=2))], 0, 2, (MARK, None)),  # the oldest mark
]


@pytest.mark.parametrize(("replicas", "ready", "consumers", "expected"), GATE_CASES)
def test_the_freshness_gate(
    replicas: list[ReplicaBeat], ready: int, consumers: int, expected: tuple[datetime | None, str | None]
) -> None:
    gate = freshness_gate(
        IngestView(NOW, tuple(replicas)),
        QueueState(ready, consumers),
        stale_after=5,
        max_lag=60,
        backlog_limit=100,
    )
    assert (gate.claim_until, gate.skipped) == expected
    assert gate.detail["consumers"] == consumers and gate.detail["ready"] == ready
    assert (gate.skipped is None) == ("why" not in gate.detail)


# reconcile: what E2B's listing means for the table


def listed(sid: str, state: str = "running", **metadata: str) -> SandboxView:
    return SandboxView(state, None, 2, 512, sid, tuple(sorted(metadata.items())))


def live(sid: str, state: State, *, settled: bool = True) -> LiveRow:
    return LiveRow(sid, state, listed=False, settled=settled)


RECONCILE_CASES = [
    # (E2B lists, live rows, known ids, scope) -> (resumed_outside, paused_outside, maybe_gone, adopted)
    ([listed("a")], [live("a", State.PAUSED)], {"a"}, None, (["a"], [], [], [])),
    ([listed("a", "paused")], [live("a", State.RUNNING)], {"a"}, None, ([], ["a"], [], [])),
    (
        [],
        [live("a", State.RUNNING), live("b", State.PAUSING), live("c", State.PAUSED)],
        {"a", "b", "c"},
        None,
        ([], [], ["a", "b", "c"], []),
    ),
    # a row written since the listing started, or with a call under way, waits for the next run
    ([listed("a", "paused")], [live("a", State.RUNNING, settled=False)], {"a"}, None, ([], [], [], [])),
    ([], [live("a", State.RUNNING, settled=False)], {"a"}, None, ([], [], [], [])),
    # agreeing rows change nothing
    (
        [listed("a"), listed("b", "paused")],
        [live("a", State.RUNNING), live("b", State.PAUSED)],
        {"a", "b"},
        None,
        ([], [], [], []),
    ),
    # PAUSING is the worker's: E2B's view of it is not acted on
    ([listed("a", "paused")], [live("a", State.PAUSING)], {"a"}, None, ([], [], [], [])),
    # strays: running and in scope are adopted; paused, out of scope or known ones are not
    (
        [listed("s1", app="b"), listed("s2", app="x"), listed("s3", "paused", app="b")],
        [],
        set(),
        {"app": "b"},
        ([], [], [], ["s1"]),
    ),
    ([listed("s1", app="b")], [], {"s1"}, {"app": "b"}, ([], [], [], [])),  # a KILLED row, say
    ([listed("s1", app="b")], [], set(), None, ([], [], [], [])),  # no scope: adopt none
    ([listed("s1", app="b", team="t")], [], set(), {"app": "b", "team": "u"}, ([], [], [], [])),
]


@pytest.mark.parametrize(("e2b", "rows", "known", "scope", "expected"), RECONCILE_CASES)
def test_the_reconcile_plan(
    e2b: list[SandboxView],
    rows: list[LiveRow],
    known: set[str],
    scope: dict[str, str] | None,
    expected: tuple[list[str], list[str], list[str], list[str]],
) -> None:
    found = plan(e2b, rows, known, scope)
    assert (
        found.resumed_outside,
        found.paused_outside,
        found.maybe_gone,
        [s.sandbox_id for s in found.adopt],
    ) == expected


# busy CPU: only a fresh sample at or above the threshold keeps a sandbox running

SAMPLE_AT = T - timedelta(seconds=4)
BUSY_CASES = [
    (CpuSample(95.0, SAMPLE_AT), 10.0, True),
    (CpuSample(10.0, SAMPLE_AT), 10.0, True),  # at the threshold
    (CpuSample(9.9, SAMPLE_AT), 10.0, False),
    (CpuSample(95.0, T - timedelta(seconds=31)), 10.0, False),  # stale: no evidence of work now
    (None, 10.0, False),  # no sample: the idle timeout decides
    (CpuSample(95.0, SAMPLE_AT), 0.0, False),  # the check is off
]


@pytest.mark.parametrize(("sample", "threshold", "busy"), BUSY_CASES)
def test_a_cpu_sample_vetoes_a_pause_only_when_fresh_and_high(
    sample: CpuSample | None, threshold: float, busy: bool
) -> None:
    assert is_busy(sample, T, threshold, max_age_s=30) is busy

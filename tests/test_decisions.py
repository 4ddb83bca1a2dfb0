"""Pure decisions: cron math, the storm breaker, retries, the token bucket. No waiting."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from consumer.e2b_adapter import CallOutcome, CallResult
from consumer.errors import ConfigError
from consumer.ratelimit import TokenBucket
from consumer.scheduler import claim_budget, scheduled_time
from consumer.state import State
from consumer.timing import backoff_delay, next_ticks, parse_duration, validate_cron
from consumer.worker import decide

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


@pytest.mark.parametrize(
    ("outcome", "attempt", "expected"),
    [
        (CallOutcome.PAUSED, 1, (State.PAUSED, "paused")),
        (CallOutcome.ALREADY_PAUSED, 1, (State.PAUSED, "already_paused")),
        (CallOutcome.GONE, 1, (State.KILLED, "gone")),
        (CallOutcome.RETRYABLE, 1, (None, "retry")),
        (CallOutcome.RETRYABLE, 5, (State.RUNNING, "pause_failed")),
        (CallOutcome.FAILED, 1, (State.RUNNING, "pause_failed")),
    ],
)
def test_worker_decisions(outcome: CallOutcome, attempt: int, expected: tuple[State | None, str]) -> None:
    decision = decide(CallResult(outcome), attempt, max_attempts=5)
    assert (decision.to_state, decision.reason) == expected


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

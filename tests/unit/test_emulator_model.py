"""The emulator's pure parts: sample times, the end-time rule, fault settings and the fault draw."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from e2b_emulator import Faults
from e2b_emulator.faults import plan
from e2b_emulator.model import Box, Sizes, latest_of, new_box, pause, run, sample_times

T0 = datetime(2026, 8, 20, 12, 0, 2, tzinfo=UTC)


def box(timeout: int = 300) -> Box:
    return new_box("sbx", 1, T0, template="base", metadata={}, timeout=timeout, sizes=Sizes())


def test_a_run_is_sampled_at_its_start_then_on_the_five_second_grid() -> None:
    assert sample_times(102, 102, None) == [102]
    assert sample_times(102, 116, None) == [102, 105, 110, 115]
    assert sample_times(100, 110, None) == [100, 105, 110]


def test_a_pinned_sample_is_the_latest_and_hides_newer_ones() -> None:
    assert sample_times(102, 140, 112) == [102, 105, 110, 112]
    assert sample_times(102, 140, 110) == [102, 105, 110]
    assert sample_times(102, 140, 90) == [90]  # older than the run: the one sample there is
    assert sample_times(102, 108, 130) == [102, 105]  # pinned after a pause: no effect


@given(
    started=st.integers(0, 10_000),
    length=st.integers(0, 200),
    pinned=st.none() | st.integers(0, 10_400),
)
def test_latest_of_is_the_last_sample(started: int, length: int, pinned: int | None) -> None:
    times = sample_times(started, started + length, pinned)
    assert times == sorted(set(times)) and times[-1] == latest_of(started, started + length, pinned)
    assert all(t % 5 == 0 or t in (started, pinned) for t in times)
    assert pinned is not None or times[-1] > started + length - 5


def test_connect_on_a_running_sandbox_moves_its_end_only_later() -> None:
    sandbox = box(timeout=600)
    assert run(sandbox, T0 + timedelta(seconds=10), 60) is False
    assert sandbox.end_at == T0 + timedelta(seconds=600)
    assert run(sandbox, T0 + timedelta(seconds=10), 900) is False
    assert sandbox.end_at == T0 + timedelta(seconds=910)


def test_resuming_a_paused_sandbox_ends_it_from_now() -> None:
    sandbox = box(timeout=3600)
    pause(sandbox, T0 + timedelta(seconds=5), memory=False)
    assert (sandbox.state, sandbox.pause_mode) == ("paused", "filesystem")
    resumed_at = T0 + timedelta(seconds=100)
    assert run(sandbox, resumed_at, 30) is True
    assert (sandbox.state, sandbox.end_at, sandbox.run_started) == (
        "running",
        resumed_at + timedelta(seconds=30),
        resumed_at,
    )


def test_sizes_are_checked_and_used_amounts_default_to_a_quarter() -> None:
    sizes = Sizes(cpu_count=4, memory_mb=1024, disk_size_mb=400).checked()
    assert (sizes.mem_used_mb, sizes.disk_used_mb) == (256, 100)
    for wrong in (Sizes(cpu_count=0), Sizes(memory_mb=100, mem_used_mb=101), Sizes(cpu_used_pct=100.5)):
        with pytest.raises(ValueError):
            wrong.checked()


def test_fault_settings_round_trip_and_reject_bad_values() -> None:
    faults = Faults(error_statuses=[503], op_latency={"pause": 2}, list_fail_after=3, missing={"a"})
    assert Faults(**faults.to_json()) == faults
    with pytest.raises(ValueError):
        faults.update({"latency": 0.1, "error_rate": 2})
    assert faults.latency == 0.0  # nothing changed
    for wrong in ({"op_latency": {"nap": 1}}, {"error_statuses": [600]}, {"list_fail_after": "2"}):
        with pytest.raises(ValueError):
            Faults(**wrong)


def test_setting_list_fail_after_starts_a_new_count() -> None:
    faults = Faults(list_fail_after=1)
    assert not faults.list_exhausted()
    faults.lists_answered += 1
    assert faults.list_exhausted()
    faults.list_fail_after = 1
    assert not faults.list_exhausted()
    faults.update({"list_fail_after": None})
    faults.lists_answered += 5
    assert not faults.list_exhausted()


def test_the_fault_draw_goes_hang_then_error_then_listing_then_latency() -> None:
    rng = random.Random(3)
    assert plan(Faults(timeout_rate=1, error_rate=1), "pause", rng).hang
    assert plan(Faults(error_rate=1, error_statuses=[503]), "pause", rng).status == 503
    exhausted = Faults(list_fail_after=0)
    assert plan(exhausted, "list", rng).status == 500
    assert plan(exhausted, "info", rng).status == 0
    slow = Faults(latency=0.1, op_latency={"pause": 2.0})
    assert plan(slow, "pause", rng).delay == pytest.approx(2.1)
    assert plan(slow, "info", rng).delay == pytest.approx(0.1)

"""The two promises under races: never pause a sandbox in use, never lose an event.

One test per hole that was found, on the real RabbitMQ and PostgreSQL, with
E2B reached through the real SDK and the emulator. Each is named after what it
prevents; the holes that need an outage to show are in the fault layer.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta

import aio_pika
import orjson
import pytest

from consumer.broker import Names, message
from consumer.settings import Settings
from consumer.store import Store
from e2b_emulator import Emulator

from ..helpers.amqp import dead_lettered_by_the_broker, publish, queue_ready
from ..helpers.database import has_transition, reasons, row, state_of, states, ticks
from ..helpers.events import activities, event, ids, now
from ..helpers.metrics import metric
from ..helpers.pipeline import each_tick, ingest, ingest_running, seed, service, tick, tick_with_ingest, work
from ..helpers.processes import cli
from ..helpers.waiting import wait_for, wait_until_equal


def end_at(emulator: Emulator, sandbox_id: str) -> datetime:
    """The sandbox's end of life in E2B."""
    sandbox = emulator.sandbox(sandbox_id)
    assert sandbox is not None, f"E2B has no sandbox {sandbox_id}"
    return sandbox.end_at


@dataclass(frozen=True)
class Before:
    """What a race test compares with after the repair."""

    end_at: datetime
    paused_in_use: float


@contextlib.asynccontextmanager
async def claimed(
    settings: Settings, store: Store, emulator: Emulator, sandbox: str
) -> AsyncIterator[Before]:
    """An idle sandbox claimed (PAUSING) inside the block, with ingest running and caught up."""
    await seed(settings, emulator, idle=[sandbox])
    before = Before(end_at(emulator, sandbox), metric("autopause_paused_in_use_total"))
    async with ingest_running(settings):
        await tick(settings)
        assert await state_of(store, sandbox) == "PAUSING"
        yield before


async def assert_repaired_once(store: Store, emulator: Emulator, sandbox: str, before: Before) -> None:
    """The sandbox runs again in E2B and in the table, after one repair that kept its lifetime."""
    assert emulator.state_of(sandbox) == "running"
    assert await state_of(store, sandbox) == "RUNNING"
    assert (await reasons(store, sandbox)).count("paused_in_use") == 1
    assert metric("autopause_paused_in_use_total") == before.paused_in_use + 1
    assert end_at(emulator, sandbox) >= before.end_at


async def test_activity_during_the_pause_call_resumes_the_sandbox_at_once(
    pause_settings: Settings, store: Store, channel: aio_pika.abc.AbstractChannel, emulator: Emulator
) -> None:
    async with claimed(pause_settings, store, emulator, "race-1") as before:
        emulator.faults.latency = 1.5  # each call: time to be seen inside it, well under its timeout
        async with service(pause_settings, {"worker"}) as worker:

            async def calling() -> bool:
                return (await row(store, "race-1"))["attempt_id"] is not None

            await wait_for(calling, what="the worker inside its pause call")
            await publish(channel, pause_settings, [event("activity", "race-1")])
            await wait_for(
                lambda: has_transition(store, "race-1", "paused_in_use"), timeout=30, what="the repair"
            )
            assert not worker.done()
    await assert_repaired_once(store, emulator, "race-1", before)


async def test_activity_committed_after_the_pause_was_written_still_resumes_the_sandbox(
    pause_settings: Settings, store: Store, channel: aio_pika.abc.AbstractChannel, emulator: Emulator
) -> None:
    async with claimed(pause_settings, store, emulator, "late-1") as before:
        claimed_at = time.monotonic()
        await work(pause_settings)
        assert await state_of(store, "late-1") == "PAUSED"
        assert emulator.state_of("late-1") == "paused"
        # the user typed while the pause call ran; the event only lands now
        during_call = now() - timedelta(seconds=(time.monotonic() - claimed_at) / 2)
        await publish(channel, pause_settings, [event("activity", "late-1", at=during_call)])
        await wait_until_equal(lambda: state_of(store, "late-1"), "RUNNING", what="the row back to RUNNING")
    await work(pause_settings)
    await assert_repaired_once(store, emulator, "late-1", before)
    async with store.pool.acquire() as conn:
        detail = await conn.fetchval(
            "SELECT detail FROM session_transitions WHERE sandbox_id = 'late-1' AND reason = 'paused_in_use'"
        )
    times = orjson.loads(detail)
    assert datetime.fromisoformat(times["activity_at"]) > datetime.fromisoformat(times["claimed_activity"])


async def test_a_dead_ingest_never_lets_busy_sandboxes_be_paused(
    ticking_settings: Settings, store: Store, channel: aio_pika.abc.AbstractChannel, emulator: Emulator
) -> None:
    settings = ticking_settings
    timeout = settings.default_idle_timeout
    busy = ids("busy", 5)
    for sid in busy:
        emulator.add_sandbox(sid)
    await publish(channel, settings, [event("created", sid) for sid in busy])
    await ingest(settings)  # the rows exist; from now on nobody ingests
    async with service(settings, {"scheduler", "worker"}):
        # the users keep working, one round of activity per tick
        await each_tick(store, 3 * timeout, lambda: publish(channel, settings, activities(busy)))
    assert emulator.calls("pause") == []
    assert set((await states(store)).values()) == {"RUNNING"}
    recorded = await ticks(store)
    assert recorded and all(t["claimed"] == 0 for t in recorded)
    # once the deadlines passed, every tick refused to claim, and said why
    judged = [t for t in recorded if "next_due_in_s" not in orjson.loads(t["detail"])]
    assert len(judged) >= 3 and {t["skipped"] for t in judged} == {"ingest_stale"}
    assert orjson.loads(judged[-1]["detail"])["consumers"] == 0


async def test_dead_letters_the_broker_made_are_reported_as_delivery_limit(
    settings: Settings, channel: aio_pika.abc.AbstractChannel, store: Store
) -> None:
    created = orjson.dumps(event("created", "sbx-looping"))
    await dead_lettered_by_the_broker(channel, settings, [("sandbox.created", message(created))])
    done = await cli(settings, "status", "--json", AUTOPAUSE_DELIVERY_LIMIT="1")
    assert done.returncode == 0, done.stderr
    assert orjson.loads(done.stdout)["dead_letters"]["events"] == {"delivery limit": 1}


async def test_a_lease_copy_and_its_original_make_one_e2b_call(
    pause_settings: Settings, store: Store, channel: aio_pika.abc.AbstractChannel, emulator: Emulator
) -> None:
    await seed(pause_settings, emulator, idle=["twice-1"])
    async with ingest_running(pause_settings):
        await tick(pause_settings)
        # the workers were down longer than the lease: the tick sends a copy of the queued command
        async with store.pool.acquire() as conn:
            await conn.execute("UPDATE sandbox_sessions SET claimed_at = now() - interval '1 hour'")
        await tick(pause_settings)
    names = Names(pause_settings.topology_prefix)
    assert await queue_ready(channel, names.pause_queue) == 2
    emulator.faults.latency = 0.5  # both copies are in hand at once
    # the copy waits out the original's hold on the row (Settings.attempt_hold): keep it short
    await work(pause_settings.model_copy(update={"e2b_request_timeout": 1.5}))
    assert (await row(store, "twice-1"))["state"] == "PAUSED"
    assert len(emulator.calls("pause", "twice-1")) == 1


async def test_a_fractional_retention_expires_only_what_is_older(
    pause_settings: Settings, store: Store, channel: aio_pika.abc.AbstractChannel, emulator: Emulator
) -> None:
    await seed(pause_settings, emulator, idle=["kept-1", "old-1"])
    half_day = pause_settings.model_copy(update={"retention_days": 0.5, "auto_pause_enabled": False})
    async with store.pool.acquire() as conn:
        await conn.execute(
            "UPDATE sandbox_sessions SET state = 'PAUSED', paused_at = now() - interval '1 hour'"
        )
        await conn.execute(
            "UPDATE sandbox_sessions SET paused_at = now() - interval '13 hours' WHERE sandbox_id = 'old-1'"
        )
    await tick(half_day)
    assert await states(store) == {"kept-1": "PAUSED", "old-1": "EXPIRED"}
    assert (await ticks(store))[-1]["error"] is None


async def test_leaving_dry_run_makes_parked_sandboxes_due_again(
    pause_settings: Settings, store: Store, channel: aio_pika.abc.AbstractChannel, emulator: Emulator
) -> None:
    await seed(pause_settings, emulator, idle=["parked-1"])
    dry = pause_settings.model_copy(update={"dry_run": True})
    async with ingest_running(pause_settings):
        await tick(dry)
        await work(dry)
        assert emulator.calls() == []
        assert (await row(store, "parked-1"))["state"] == "RUNNING"
        await tick(pause_settings)
        await work(pause_settings)
    assert (await row(store, "parked-1"))["state"] == "PAUSED"
    assert emulator.state_of("parked-1") == "paused"


async def test_e2b_answering_busy_is_retried_until_the_sandbox_is_paused(
    pause_settings: Settings, store: Store, channel: aio_pika.abc.AbstractChannel, emulator: Emulator
) -> None:
    idle = ids("busy503", 10)
    await seed(pause_settings, emulator, idle=idle)
    emulator.faults.update({"error_rate": 0.5, "error_statuses": [503]})
    patient = pause_settings.model_copy(update={"pause_max_attempts": 20})
    await tick_with_ingest(patient)
    await work(patient)
    assert set((await states(store)).values()) == {"PAUSED"}
    statuses = {c.status for c in emulator.calls()}
    assert 503 in statuses and not statuses & {500, 502}


async def test_a_producer_clock_lagging_past_the_timeout_cannot_get_a_busy_sandbox_paused(
    ticking_settings: Settings,
    store: Store,
    channel: aio_pika.abc.AbstractChannel,
    emulator: Emulator,
    caplog: pytest.LogCaptureFixture,
) -> None:
    lag = 60.0
    settings = ticking_settings.model_copy(update={"producer_skew_warning": 30.0})
    timeout = settings.default_idle_timeout
    emulator.add_sandbox("skewed-1")
    exchange = await channel.get_exchange(Names(settings.topology_prefix).events_exchange)

    async def send(kind: str) -> None:
        body = orjson.dumps(event(kind, "skewed-1", at=now() - timedelta(seconds=lag)))
        await exchange.publish(aio_pika.Message(body, app_id="slow-clock-app"), routing_key=f"sandbox.{kind}")

    await send("created")
    async with service(settings, {"ingest", "scheduler", "worker"}):
        await wait_for(lambda: state_of(store, "skewed-1"), what="the row")
        await each_tick(store, 3 * timeout, lambda: send("activity"))  # busy all along, stamped late
    assert emulator.calls("pause") == []
    assert (await row(store, "skewed-1"))["state"] == "RUNNING"
    assert metric("autopause_producer_clock_skew_seconds", producer="slow-clock-app") >= lag - 5
    assert any("clock" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)

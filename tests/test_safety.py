"""The two promises under races and outages: never pause a sandbox in use, never lose an event.

One test per hole that was found, on the real RabbitMQ and PostgreSQL, with
E2B reached through the real SDK and the emulator. Each is named after what it
prevents.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from functools import partial
from typing import Any

import aio_pika
import aiohttp
import orjson
import pytest
from conftest import (
    DATABASE_URL,
    E2B_KEY,
    ago,
    arrived_long_ago,
    autopause,
    dead_letters,
    event,
    failing_writes,
    ingest_caught_up,
    isolated_env,
    metric,
    now,
    publish,
    queue_ready,
    refusing_queue,
    row,
    service,
    transitions,
    wait_for,
)
from tcpproxy import Proxy

from consumer import runner
from consumer.broker import REASON_HEADER, Names, declare_topology
from consumer.errors import ConfigError
from consumer.settings import Settings, load_settings
from consumer.store import Store
from e2b_emulator import Emulator


async def ingest_now(settings: Settings) -> None:
    assert await runner.run(settings, {"ingest"}, burst=True) == 0


async def states(store: Store) -> dict[str, str]:
    async with store.pool.acquire() as conn:
        rows = await conn.fetch("SELECT sandbox_id, state FROM sandbox_sessions")
    return {r["sandbox_id"]: r["state"] for r in rows}


async def seed_idle(
    channel: aio_pika.abc.AbstractChannel,
    settings: Settings,
    store: Store,
    emulator: Emulator,
    ids: list[str],
) -> None:
    """Sandboxes running in E2B whose rows have been idle for an hour."""
    for sid in ids:
        emulator.add_sandbox(sid)
    await publish(channel, settings, [event("created", sid, at=ago(3600)) for sid in ids])
    await ingest_now(settings)
    await arrived_long_ago(settings)


async def ticks(store: Store) -> list[dict[str, Any]]:
    async with store.pool.acquire() as conn:
        return [dict(r) for r in await conn.fetch("SELECT * FROM scheduler_ticks ORDER BY tick_at")]


async def end_at(emulator: Emulator, sandbox_id: str) -> datetime:
    """The sandbox's end of life as E2B reports it (get_info)."""
    async with (
        aiohttp.ClientSession(headers={"X-API-KEY": E2B_KEY}) as http,
        http.get(f"{emulator.url}/sandboxes/{sandbox_id}") as response,
    ):
        detail = await response.json()
    return datetime.fromisoformat(detail["endAt"])


# 1. an uncommitted event is never acked ---------------------------------------------


async def test_a_dead_letter_the_broker_refuses_is_never_acked(
    settings: Settings, store: Store, channel: aio_pika.abc.AbstractChannel
) -> None:
    names = Names(settings.topology_prefix)
    async with service(settings, {"ingest"}):
        async with refusing_queue(names.events_dlq):
            await publish(channel, settings, [event("created", "sbx-v1"), b"{not json"])
            await wait_for(lambda: _has_row(store, "sbx-v1"), what="the valid neighbour committed")
            # a later batch: its acks must not cover the invalid message still waiting for its dead letter
            await publish(channel, settings, [event("created", "sbx-v2")])
            await wait_for(lambda: _has_row(store, "sbx-v2"), what="the later batch committed")
        # the dead-letter queue takes messages again: the held invalid message gets there
        await wait_for(
            lambda: queue_ready(channel, names.events_dlq), timeout=30, what="the held dead letter"
        )
    dead = await dead_letters(channel, names.events_dlq)
    assert [(m.body, m.headers[REASON_HEADER]) for m in dead] == [(b"{not json", "invalid_json")]


async def _has_row(store: Store, sandbox_id: str) -> bool:
    return sandbox_id in await states(store)


# 2. a held batch's clock never goes stale -------------------------------------------


async def test_a_database_outage_longer_than_the_clock_skew_dead_letters_no_valid_event(
    settings: Settings, store: Store, channel: aio_pika.abc.AbstractChannel
) -> None:
    proxy = Proxy("127.0.0.1", 5432)
    port = await proxy.start()
    skew = 1.0
    through_proxy = settings.model_copy(
        update={
            "database_url": type(settings.database_url)(DATABASE_URL.replace(":5432", f":{port}")),
            "clock_skew": skew,
        }
    )
    names = Names(settings.topology_prefix)

    async def delivered() -> bool:
        return await queue_ready(channel, names.events_queue) == 0

    try:
        async with service(through_proxy, {"ingest"}):
            await wait_for(lambda: _consumers(channel, names.events_queue), what="ingest consuming")
            await proxy.cut()
            outages = metric("autopause_store_unavailable_total", role="ingest")
            await publish(channel, settings, [event("created", "sbx-first")])
            await wait_for(
                lambda: _true(metric("autopause_store_unavailable_total", role="ingest") > outages),
                what="the first batch held",
            )
            # the next events collect in the next batch while the first one waits
            await publish(channel, settings, [event("created", "sbx-second")])
            await wait_for(delivered, what="the second event held")
            held_since = time.monotonic()
            await wait_for(
                lambda: _true(time.monotonic() - held_since > 2 * skew), what="the outage to outlast the skew"
            )
            await publish(channel, settings, [event("created", "sbx-third", at=now())])
            await wait_for(delivered, what="the third event held")
            await proxy.restore()
            await wait_for(lambda: _row_count(store, 3), timeout=60, what="all three rows")
    finally:
        await proxy.cut()
    assert await queue_ready(channel, names.events_dlq) == 0


async def _consumers(channel: aio_pika.abc.AbstractChannel, queue: str) -> bool:
    declared = await channel.declare_queue(queue, passive=True)
    return bool(declared.declaration_result.consumer_count)


async def _true(value: bool) -> bool:
    return value


async def _row_count(store: Store, n: int) -> bool:
    return len(await states(store)) == n


# 3. a pause that raced with activity is repaired at once ----------------------------------


async def test_activity_during_the_pause_call_resumes_the_sandbox_at_once(
    pause_settings: Settings, store: Store, channel: aio_pika.abc.AbstractChannel, emulator: Emulator
) -> None:
    await seed_idle(channel, pause_settings, store, emulator, ["race-1"])
    lifetime_before = await end_at(emulator, "race-1")
    in_use_before = metric("autopause_paused_in_use_total")
    async with service(pause_settings, {"ingest"}):
        await wait_for(lambda: ingest_caught_up(pause_settings), what="ingest caught up")
        assert await runner.run(pause_settings, {"scheduler"}, once=True) == 0
        assert (await states(store))["race-1"] == "PAUSING"
        emulator.faults.latency = 3.0
        async with service(pause_settings, {"worker"}) as worker:

            async def calling() -> bool:
                return (await row(store, "race-1"))["attempt_id"] is not None

            await wait_for(calling, what="the worker inside its pause call")
            await publish(channel, pause_settings, [event("activity", "race-1")])
            await wait_for(
                lambda: _has_transition(store, "race-1", "paused_in_use"), timeout=30, what="the repair"
            )
            assert not worker.done()
    assert emulator.state_of("race-1") == "running"
    assert (await row(store, "race-1"))["state"] == "RUNNING"
    reasons = [reason for _, _, reason, _ in await transitions(store, "race-1")]
    assert reasons.count("paused_in_use") == 1
    assert metric("autopause_paused_in_use_total") == in_use_before + 1
    assert await end_at(emulator, "race-1") >= lifetime_before


async def test_activity_committed_after_the_pause_was_written_still_resumes_the_sandbox(
    pause_settings: Settings, store: Store, channel: aio_pika.abc.AbstractChannel, emulator: Emulator
) -> None:
    await seed_idle(channel, pause_settings, store, emulator, ["late-1"])
    lifetime_before = await end_at(emulator, "late-1")
    in_use_before = metric("autopause_paused_in_use_total")
    async with service(pause_settings, {"ingest"}):
        await wait_for(lambda: ingest_caught_up(pause_settings), what="ingest caught up")
        assert await runner.run(pause_settings, {"scheduler"}, once=True) == 0
        claimed = time.monotonic()
        assert await runner.run(pause_settings, {"worker"}, burst=True) == 0
        assert (await row(store, "late-1"))["state"] == "PAUSED"
        assert emulator.state_of("late-1") == "paused"
        # the user typed while the pause call ran; the event only lands now
        during_call = now() - timedelta(seconds=(time.monotonic() - claimed) / 2)
        await publish(channel, pause_settings, [event("activity", "late-1", at=during_call)])
        await wait_for(lambda: _state_is(store, "late-1", "RUNNING"), what="the row back to RUNNING")
    assert await runner.run(pause_settings, {"worker"}, burst=True) == 0
    assert emulator.state_of("late-1") == "running"
    reasons = [reason for _, _, reason, _ in await transitions(store, "late-1")]
    assert reasons.count("paused_in_use") == 1
    assert metric("autopause_paused_in_use_total") == in_use_before + 1
    assert await end_at(emulator, "late-1") >= lifetime_before
    async with store.pool.acquire() as conn:
        detail = await conn.fetchval(
            "SELECT detail FROM session_transitions WHERE sandbox_id = 'late-1' AND reason = 'paused_in_use'"
        )
    times = orjson.loads(detail)
    assert datetime.fromisoformat(times["activity_at"]) > datetime.fromisoformat(times["claimed_activity"])


async def _has_transition(store: Store, sandbox_id: str, reason: str) -> bool:
    return any(r == reason for _, _, r, _ in await transitions(store, sandbox_id))


async def _state_is(store: Store, sandbox_id: str, state: str) -> bool:
    return (await states(store)).get(sandbox_id) == state


# 4. the scheduler never pauses while ingest is down or behind ------------------------------


async def test_a_dead_ingest_never_lets_busy_sandboxes_be_paused(
    pause_settings: Settings, store: Store, channel: aio_pika.abc.AbstractChannel, emulator: Emulator
) -> None:
    timeout = 2.0
    settings = pause_settings.model_copy(update={"default_idle_timeout": timeout, "tick_cron": "* * * * * *"})
    busy = [f"busy-{i}" for i in range(5)]
    for sid in busy:
        emulator.add_sandbox(sid)
    await publish(channel, settings, [event("created", sid) for sid in busy])
    await ingest_now(settings)  # the rows exist; from now on nobody ingests
    async with service(settings, {"scheduler", "worker"}):
        # the users keep working, one round of activity per tick
        await each_tick(store, 3 * timeout, lambda: publish(channel, settings, activity(busy)))
    assert emulator.calls("pause") == []
    assert set((await states(store)).values()) == {"RUNNING"}
    recorded = await ticks(store)
    assert recorded and all(t["claimed"] == 0 for t in recorded)
    # once the deadlines passed, every tick refused to claim, and said why
    judged = [t for t in recorded if "next_due_in_s" not in orjson.loads(t["detail"])]
    assert len(judged) >= 3 and {t["skipped"] for t in judged} == {"ingest_stale"}
    assert orjson.loads(judged[-1]["detail"])["consumers"] == 0


async def _more_ticks(store: Store, than: int) -> bool:
    return len(await ticks(store)) > than


def activity(sandbox_ids: list[str]) -> list[dict[str, Any] | bytes]:
    return [event("activity", sid) for sid in sandbox_ids]


async def each_tick(store: Store, seconds: float, work: Callable[[], Awaitable[object]]) -> None:
    """Do ``work`` once per scheduler tick, for at least ``seconds`` and four ticks."""
    started = time.monotonic()
    seen = 0
    while time.monotonic() - started < seconds or seen < 4:
        await work()
        seen = len(await ticks(store))
        await wait_for(partial(_more_ticks, store, seen), timeout=10, what="the next tick")


async def test_events_a_stuck_ingest_holds_keep_busy_sandboxes_from_being_claimed(
    pause_settings: Settings, store: Store, channel: aio_pika.abc.AbstractChannel, emulator: Emulator
) -> None:
    timeout = 2.0
    settings = pause_settings.model_copy(
        update={"default_idle_timeout": timeout, "tick_cron": "* * * * * *", "ingest_max_lag": 3.0}
    )
    busy = [f"held-{i}" for i in range(5)]
    for sid in busy:
        emulator.add_sandbox(sid)
    await publish(channel, settings, [event("created", sid) for sid in busy])
    async with service(settings, {"ingest", "scheduler", "worker"}):
        await wait_for(lambda: ingest_caught_up(pause_settings), what="ingest caught up")
        async with failing_writes(store, "53100"):  # disk full: ingest holds what it has
            await each_tick(store, 3 * timeout, lambda: publish(channel, settings, activity(busy)))
            assert emulator.calls("pause") == []
            assert "ingest_stale" in {t["skipped"] for t in await ticks(store)}
    assert emulator.calls("pause") == []
    assert set((await states(store)).values()) == {"RUNNING"}


# 5. database errors are outages, never crashes or dead letters -------------------------------


@pytest.mark.parametrize(
    "sqlstate", ["25006", "53100", "57014"], ids=["read_only", "disk_full", "statement_cancelled"]
)
async def test_a_database_error_while_writing_holds_events_and_never_stops_ingest(
    settings: Settings, store: Store, channel: aio_pika.abc.AbstractChannel, sqlstate: str
) -> None:
    names = Names(settings.topology_prefix)
    bodies = [event("created", f"sbx-{sqlstate}-{i}") for i in range(20)]
    outages = metric("autopause_store_unavailable_total", role="ingest")
    async with service(settings, {"ingest"}) as ingest:
        await wait_for(lambda: _consumers(channel, names.events_queue), what="ingest consuming")
        async with failing_writes(store, sqlstate):
            await publish(channel, settings, list(bodies))
            await wait_for(
                lambda: _true(metric("autopause_store_unavailable_total", role="ingest") > outages + 1),
                what="the error seen as an outage, and retried",
            )
            assert not ingest.done()
            assert await states(store) == {}
        await wait_for(lambda: _row_count(store, 20), timeout=30, what="ingest to resume")
        assert not ingest.done()
    assert await queue_ready(channel, names.events_dlq) == 0


async def test_a_database_error_in_the_worker_neither_crashes_it_nor_strands_its_command(
    pause_settings: Settings, store: Store, channel: aio_pika.abc.AbstractChannel, emulator: Emulator
) -> None:
    await seed_idle(channel, pause_settings, store, emulator, ["db-err-1"])
    async with service(pause_settings, {"ingest"}):
        await wait_for(lambda: ingest_caught_up(pause_settings), what="ingest caught up")
        assert await runner.run(pause_settings, {"scheduler"}, once=True) == 0
    outages = metric("autopause_store_unavailable_total", role="worker")
    async with service(pause_settings, {"worker"}) as worker:
        async with failing_writes(store, "25006"):  # a read-only standby after a failover
            await wait_for(
                lambda: _true(metric("autopause_store_unavailable_total", role="worker") > outages + 1),
                what="the worker meeting the error",
            )
            assert not worker.done()
        await wait_for(lambda: _state_is(store, "db-err-1", "PAUSED"), timeout=30, what="the pause finished")
        assert not worker.done()
    assert emulator.state_of("db-err-1") == "paused"
    assert len([c for c in emulator.calls("pause") if c.status == 204]) == 1


async def test_dead_letters_the_broker_made_are_reported_as_delivery_limit(
    settings: Settings, channel: aio_pika.abc.AbstractChannel, store: Store
) -> None:
    limited = settings.model_copy(update={"delivery_limit": 1})
    names = Names(settings.topology_prefix)
    # a consumer that keeps crashing returns the message until the broker gives up on it
    for queue in (names.events_queue, names.pause_queue):
        await channel.queue_delete(queue)
    await declare_topology(channel, limited)
    await publish(channel, settings, [event("created", "sbx-looping")])
    queue = await channel.get_queue(names.events_queue)
    for _ in range(3):
        msg = await queue.get(fail=False)
        if msg is None:
            break
        await msg.nack(requeue=True)
    await wait_for(lambda: queue_ready(channel, names.events_dlq), what="the broker's dead letter")
    env = isolated_env(settings, AUTOPAUSE_DELIVERY_LIMIT="1")
    proc = await asyncio.create_subprocess_exec(
        *autopause("status", "--json"), env=env, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    report = orjson.loads(out)
    assert report["dead_letters"]["events"] == {"delivery limit": 1}


# 6. one E2B call per claim, and settings that cannot contradict each other -------------------


async def test_a_lease_copy_and_its_original_make_one_e2b_call(
    pause_settings: Settings, store: Store, channel: aio_pika.abc.AbstractChannel, emulator: Emulator
) -> None:
    await seed_idle(channel, pause_settings, store, emulator, ["twice-1"])
    async with service(pause_settings, {"ingest"}):
        await wait_for(lambda: ingest_caught_up(pause_settings), what="ingest caught up")
        assert await runner.run(pause_settings, {"scheduler"}, once=True) == 0
        # the workers were down longer than the lease: the tick sends a copy of the queued command
        async with store.pool.acquire() as conn:
            await conn.execute("UPDATE sandbox_sessions SET claimed_at = now() - interval '1 hour'")
        assert await runner.run(pause_settings, {"scheduler"}, once=True) == 0
    names = Names(pause_settings.topology_prefix)
    assert await queue_ready(channel, names.pause_queue) == 2
    emulator.faults.latency = 1.0  # both copies are in hand at once
    assert await runner.run(pause_settings, {"worker"}, burst=True) == 0
    assert (await row(store, "twice-1"))["state"] == "PAUSED"
    assert len(emulator.calls("pause", "twice-1")) == 1


def test_settings_that_cannot_fit_a_pause_in_its_lease_are_refused() -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings(e2b_request_timeout=60, pause_max_attempts=10, pause_lease=300)
    assert "AUTOPAUSE_PAUSE_LEASE" in str(refused.value)
    assert "AUTOPAUSE_E2B_REQUEST_TIMEOUT" in str(refused.value)
    assert load_settings().pause_lease >= 2 * load_settings().e2b_request_timeout


# 7. retention takes fractions of days --------------------------------------------------------


async def test_a_fractional_retention_expires_only_what_is_older(
    pause_settings: Settings, store: Store, channel: aio_pika.abc.AbstractChannel, emulator: Emulator
) -> None:
    await seed_idle(channel, pause_settings, store, emulator, ["kept-1", "old-1"])
    half_day = pause_settings.model_copy(update={"retention_days": 0.5, "auto_pause_enabled": False})
    async with store.pool.acquire() as conn:
        await conn.execute(
            "UPDATE sandbox_sessions SET state = 'PAUSED', paused_at = now() - interval '1 hour'"
        )
        await conn.execute(
            "UPDATE sandbox_sessions SET paused_at = now() - interval '13 hours' WHERE sandbox_id = 'old-1'"
        )
    assert await runner.run(half_day, {"scheduler"}, once=True) == 0
    assert await states(store) == {"kept-1": "PAUSED", "old-1": "EXPIRED"}
    assert (await ticks(store))[-1]["error"] is None


# 8. a command that could not be published releases its claim ------------------------------


async def test_commands_the_broker_refuses_release_their_claims_at_once(
    pause_settings: Settings, store: Store, channel: aio_pika.abc.AbstractChannel, emulator: Emulator
) -> None:
    idle = [f"refused-{i}" for i in range(5)]
    await seed_idle(channel, pause_settings, store, emulator, idle)
    due_before = {sid: (await row(store, sid))["pause_due_at"] for sid in idle}
    names = Names(pause_settings.topology_prefix)
    async with service(pause_settings, {"ingest"}):
        await wait_for(lambda: ingest_caught_up(pause_settings), what="ingest caught up")
        async with refusing_queue(names.pause_queue):
            assert await runner.run(pause_settings, {"scheduler"}, once=True) == 0
    assert set((await states(store)).values()) == {"RUNNING"}
    for sid in idle:
        assert (await row(store, sid))["pause_due_at"] == due_before[sid]
        assert [(f, t, r) for f, t, r, _ in await transitions(store, sid)][-2:] == [
            ("RUNNING", "PAUSING", "idle"),
            ("PAUSING", "RUNNING", "publish_failed"),
        ]


# 9. leaving dry run makes parked sandboxes due again --------------------------------------------


async def test_leaving_dry_run_makes_parked_sandboxes_due_again(
    pause_settings: Settings, store: Store, channel: aio_pika.abc.AbstractChannel, emulator: Emulator
) -> None:
    await seed_idle(channel, pause_settings, store, emulator, ["parked-1"])
    dry = pause_settings.model_copy(update={"dry_run": True})
    async with service(pause_settings, {"ingest"}):
        await wait_for(lambda: ingest_caught_up(pause_settings), what="ingest caught up")
        assert await runner.run(dry, {"scheduler"}, once=True) == 0
        assert await runner.run(dry, {"worker"}, burst=True) == 0
        assert emulator.calls() == []
        assert (await row(store, "parked-1"))["state"] == "RUNNING"
        assert await runner.run(pause_settings, {"scheduler"}, once=True) == 0
        assert await runner.run(pause_settings, {"worker"}, burst=True) == 0
    assert (await row(store, "parked-1"))["state"] == "PAUSED"
    assert emulator.state_of("parked-1") == "paused"


# 10. E2B's "busy" is retried ---------------------------------------------------------------


async def test_e2b_answering_busy_is_retried_until_the_sandbox_is_paused(
    pause_settings: Settings, store: Store, channel: aio_pika.abc.AbstractChannel, emulator: Emulator
) -> None:
    idle = [f"busy503-{i}" for i in range(10)]
    await seed_idle(channel, pause_settings, store, emulator, idle)
    emulator.faults.update({"error_rate": 0.5, "error_statuses": [503]})
    patient = pause_settings.model_copy(update={"pause_max_attempts": 20})
    async with service(patient, {"ingest"}):
        await wait_for(lambda: ingest_caught_up(pause_settings), what="ingest caught up")
        assert await runner.run(patient, {"scheduler"}, once=True) == 0
    assert await runner.run(patient, {"worker"}, burst=True) == 0
    assert set((await states(store)).values()) == {"PAUSED"}
    statuses = {c.status for c in emulator.calls()}
    assert 503 in statuses and not statuses & {500, 502}


# 11. a producer's clock cannot make a busy sandbox look idle -------------------------------


async def test_a_producer_clock_lagging_past_the_timeout_cannot_get_a_busy_sandbox_paused(
    pause_settings: Settings,
    store: Store,
    channel: aio_pika.abc.AbstractChannel,
    emulator: Emulator,
    caplog: pytest.LogCaptureFixture,
) -> None:
    timeout = 2.0
    lag = 60.0
    settings = pause_settings.model_copy(
        update={"default_idle_timeout": timeout, "tick_cron": "* * * * * *", "producer_skew_warning": 30.0}
    )
    emulator.add_sandbox("skewed-1")
    exchange = await channel.get_exchange(Names(settings.topology_prefix).events_exchange)

    async def send(kind: str) -> None:
        body = orjson.dumps(event(kind, "skewed-1", at=now() - timedelta(seconds=lag)))
        await exchange.publish(aio_pika.Message(body, app_id="slow-clock-app"), routing_key=f"sandbox.{kind}")

    await send("created")
    async with service(settings, {"ingest", "scheduler", "worker"}):
        await wait_for(lambda: _has_row(store, "skewed-1"), what="the row")
        await each_tick(store, 3 * timeout, lambda: send("activity"))  # busy all along, stamped late
    assert emulator.calls("pause") == []
    assert (await row(store, "skewed-1"))["state"] == "RUNNING"
    assert metric("autopause_producer_clock_skew_seconds", producer="slow-clock-app") >= lag - 5
    assert any("clock" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)


# 1 (again), with the real PostgreSQL stopped: the SIGTERM case ---------------------------------


@pytest.mark.fault
async def test_sigterm_while_postgres_is_down_loses_no_event(
    settings: Settings, store: Store, channel: aio_pika.abc.AbstractChannel, spawn: Any
) -> None:
    from services import ensure_postgres, start_postgres, stop_postgres

    names = Names(settings.topology_prefix)
    port = _free_port()
    env = isolated_env(settings, AUTOPAUSE_METRICS_PORT=str(port), AUTOPAUSE_FLUSH_INTERVAL="0.05")
    proc = spawn(autopause("run", "ingest"), env)
    await wait_for(lambda: _consumers(channel, names.events_queue), timeout=30, what="ingest consuming")
    try:
        await stop_postgres()
        await publish(channel, settings, [event("created", "sbx-kept")])
        await wait_for(lambda: _scraped(port, "autopause_ingest_unsettled", 1), what="the valid event held")
        await publish(channel, settings, [b"{not json"])
        await wait_for(
            lambda: _scraped(port, "autopause_ingest_unsettled", 2), what="the invalid one in hand"
        )
        proc.send_signal(15)
        assert await asyncio.to_thread(proc.wait, 60) == 0
        await start_postgres()
    finally:
        await ensure_postgres()
    again = spawn(autopause("run", "ingest", "--burst"), env | {"AUTOPAUSE_METRICS_PORT": "0"})
    assert await asyncio.to_thread(again.wait, 120) == 0
    assert await states(store) == {"sbx-kept": "RUNNING"}
    dead = await dead_letters(channel, names.events_dlq)
    assert [m.body for m in dead] == [b"{not json"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _scraped(port: int, name: str, value: float) -> bool:
    try:
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/metrics") as response:
            text = await response.text()
    except aiohttp.ClientError:
        return False
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1]) == value
    return False

"""PostgreSQL out of reach (a cut proxy) or refusing writes (a trigger raises): outages, never crashes.

Ingest holds what it took and acks nothing; the worker keeps its command; the
scheduler claims nothing while ingest cannot vouch for the events; readiness
follows the database. Each recovers by itself when the database is back.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import aio_pika
import aiohttp
import pytest

from consumer.broker import Broker, Names
from consumer.health import Health
from consumer.scheduler import Scheduler
from consumer.settings import Settings
from consumer.store import Store
from e2b_emulator import Emulator

from ..helpers.amqp import consumers, publish, queue_ready
from ..helpers.database import (
    count_rows,
    failing_writes,
    held_at_least,
    ingest_caught_up,
    rows_of,
    state_of,
    states,
    ticks,
)
from ..helpers.events import activities, event, expected_rows, ids, now
from ..helpers.metrics import metric, sample, scrape
from ..helpers.pipeline import each_tick, ingest_running, seed, service, tick, tick_with_ingest
from ..helpers.processes import free_port
from ..helpers.proxies import database_proxy
from ..helpers.waiting import wait_for, wait_until_equal


async def test_database_outage_holds_the_batch_and_resumes(
    settings: Settings, store: Store, channel: aio_pika.abc.AbstractChannel
) -> None:
    names = Names(settings.topology_prefix)
    first = [event("created", f"sbx-a{i}") for i in range(50)]
    second = [event("created", f"sbx-b{i}") for i in range(50)]
    async with database_proxy(settings) as (proxy, through_proxy), service(through_proxy, {"ingest"}):
        await publish(channel, settings, list(first))
        await wait_until_equal(lambda: count_rows(store), 50, what="all first rows")

        await proxy.cut()
        await publish(channel, settings, list(second))
        # delivered to ingest, held, not acked
        await wait_until_equal(
            lambda: queue_ready(channel, names.events_queue), 0, what="the second batch held"
        )
        assert await count_rows(store) == 50
        await proxy.restore()
        await wait_until_equal(lambda: count_rows(store), 100, timeout=60, what="ingest to resume")
    assert await rows_of(store) == expected_rows(first + second)
    # stopped: anything not acked would be ready again; nothing was dead-lettered
    assert await queue_ready(channel, names.events_queue) == 0
    assert await queue_ready(channel, names.events_dlq) == 0


async def test_a_database_outage_longer_than_the_clock_skew_dead_letters_no_valid_event(
    settings: Settings, store: Store, channel: aio_pika.abc.AbstractChannel
) -> None:
    skew = 1.0
    names = Names(settings.topology_prefix)

    async def delivered() -> bool:
        return await queue_ready(channel, names.events_queue) == 0

    async with (
        database_proxy(settings, clock_skew=skew) as (proxy, through_proxy),
        service(through_proxy, {"ingest"}),
    ):
        await wait_for(lambda: consumers(channel, names.events_queue), what="ingest consuming")
        await proxy.cut()
        outages = metric("autopause_store_unavailable_total", role="ingest")
        await publish(channel, settings, [event("created", "sbx-first")])
        await wait_for(
            lambda: metric("autopause_store_unavailable_total", role="ingest") > outages,
            what="the first batch held",
        )
        # the next events collect in the next batch while the first one waits
        await publish(channel, settings, [event("created", "sbx-second")])
        await wait_for(delivered, what="the second event held")
        held_since = time.monotonic()
        await wait_for(
            lambda: time.monotonic() - held_since > 2 * skew, what="the outage to outlast the skew"
        )
        await publish(channel, settings, [event("created", "sbx-third", at=now())])
        await wait_for(delivered, what="the third event held")
        await proxy.restore()
        await wait_until_equal(lambda: count_rows(store), 3, timeout=60, what="all three rows")
    assert await queue_ready(channel, names.events_dlq) == 0


async def test_events_a_stuck_ingest_holds_keep_busy_sandboxes_from_being_claimed(
    ticking_settings: Settings, store: Store, channel: aio_pika.abc.AbstractChannel, emulator: Emulator
) -> None:
    settings = ticking_settings.model_copy(update={"ingest_max_lag": 3.0})
    timeout = settings.default_idle_timeout
    busy = ids("held", 5)
    for sid in busy:
        emulator.add_sandbox(sid)
    await publish(channel, settings, [event("created", sid) for sid in busy])
    async with service(settings, {"ingest", "scheduler", "worker"}):
        await wait_for(lambda: ingest_caught_up(settings), what="ingest caught up")
        async with failing_writes(store, "53100"):  # disk full: ingest holds what it has
            await each_tick(store, 3 * timeout, lambda: publish(channel, settings, activities(busy)))
            assert emulator.calls("pause") == []
            assert "ingest_stale" in {t["skipped"] for t in await ticks(store)}
    assert emulator.calls("pause") == []
    assert set((await states(store)).values()) == {"RUNNING"}


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
        await wait_for(lambda: consumers(channel, names.events_queue), what="ingest consuming")
        async with failing_writes(store, sqlstate):
            await publish(channel, settings, list(bodies))
            await wait_for(
                lambda: metric("autopause_store_unavailable_total", role="ingest") > outages + 1,
                what="the error seen as an outage, and retried",
            )
            assert not ingest.done()
            assert await states(store) == {}
        await wait_until_equal(lambda: count_rows(store), 20, timeout=30, what="ingest to resume")
        assert not ingest.done()
    assert await queue_ready(channel, names.events_dlq) == 0


async def test_a_database_error_in_the_worker_neither_crashes_it_nor_strands_its_command(
    pause_settings: Settings, store: Store, channel: aio_pika.abc.AbstractChannel, emulator: Emulator
) -> None:
    await seed(pause_settings, emulator, idle=["db-err-1"])
    await tick_with_ingest(pause_settings)
    outages = metric("autopause_store_unavailable_total", role="worker")
    async with service(pause_settings, {"worker"}) as worker:
        async with failing_writes(store, "25006"):  # a read-only standby after a failover
            await wait_for(
                lambda: metric("autopause_store_unavailable_total", role="worker") > outages + 1,
                what="the worker meeting the error",
            )
            assert not worker.done()
        await wait_until_equal(
            lambda: state_of(store, "db-err-1"), "PAUSED", timeout=30, what="the pause finished"
        )
        assert not worker.done()
    assert emulator.state_of("db-err-1") == "paused"
    assert len([c for c in emulator.calls("pause") if c.status == 204]) == 1


async def test_freshness_gate_waits_for_the_events_backlog(
    pause_settings: Settings, store: Store, channel: aio_pika.abc.AbstractChannel, emulator: Emulator
) -> None:
    await seed(pause_settings, emulator, idle=["fg-1"])
    limited = pause_settings.model_copy(update={"events_backlog_limit": 10})
    async with ingest_running(limited), failing_writes(store, "53100"):  # ingest holds what it takes
        await publish(channel, limited, [event("activity", f"other-{i}") for i in range(20)])
        await wait_for(lambda: held_at_least(store, 20), what="the events in hand")
        await tick(limited)
    assert await state_of(store, "fg-1") == "RUNNING"
    tick_row = await store.last_tick()
    assert tick_row is not None and tick_row.skipped == "backlog"


async def test_metrics_move_and_readiness_follows_the_database(
    settings: Settings, store: Store, channel: aio_pika.abc.AbstractChannel
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    async with (
        database_proxy(settings, metrics_port=port, metrics_host="127.0.0.1") as (proxy, watched),
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http,
    ):

        async def status_of(path: str) -> int:
            try:
                async with http.get(base + path) as response:
                    return response.status
            except aiohttp.ClientError:
                return 0

        async def exposed(name: str, **labels: str) -> float:
            return sample(await scrape(port) or "", name, **labels)

        async with service(watched, {"ingest"}) as running:
            await wait_until_equal(lambda: status_of("/readyz"), 200, what="ready")
            assert await status_of("/healthz") == 200
            ingested = await exposed("autopause_events_ingested_total", type="sandbox.activity")
            rejected = await exposed("autopause_events_rejected_total", reason="invalid_json")
            batches = await exposed("autopause_ingest_batch_size_count")
            batched = await exposed("autopause_ingest_batch_size_sum")
            lags = await exposed("autopause_ingest_lag_seconds_count")

            await publish(channel, settings, [event("activity", f"sbx-m{i}") for i in range(25)] + [b"{oops"])
            await wait_until_equal(
                lambda: exposed("autopause_events_ingested_total", type="sandbox.activity"),
                ingested + 25,
                what="the ingested counter to move by 25",
            )
            # a dead letter counts once the broker confirmed it, after the commit
            await wait_until_equal(
                lambda: exposed("autopause_events_rejected_total", reason="invalid_json"),
                rejected + 1,
                what="the rejected counter to move by 1",
            )
            # per batch, not per event: a lag for each batch that held valid events
            new_batches = await exposed("autopause_ingest_batch_size_count") - batches
            assert await exposed("autopause_ingest_batch_size_sum") - batched >= 25
            assert 1 <= await exposed("autopause_ingest_lag_seconds_count") - lags <= new_batches

            await proxy.cut()
            await wait_until_equal(lambda: status_of("/readyz"), 503, what="unready without the database")
            async with http.get(base + "/readyz") as response:
                assert (await response.json(content_type=None))["checks"]["database"] is False
            await proxy.restore()
            await wait_until_equal(lambda: status_of("/readyz"), 200, what="ready again")
        assert running.result() == 0


async def test_a_tick_that_meets_a_database_error_gives_its_lease_back(
    settings: Settings,
    store: Store,
    channel: aio_pika.abc.AbstractChannel,  # the topology declared
) -> None:
    async with store.pool.acquire() as conn:  # retention will write this row: the write fails
        await conn.execute(
            "INSERT INTO sandbox_sessions (sandbox_id, state, last_activity, pause_due_at, paused_at)"
            " VALUES ('old-1', 'PAUSED', now() - interval '400 days', now() - interval '400 days',"
            " now() - interval '400 days')"
        )
    opened = await Broker.connect(settings, "scheduler")
    try:
        scheduler = Scheduler(settings, store, opened, Health())
        scheduler.commands = await opened.publisher(opened.names.commands_exchange, confirm=True)
        first = datetime.now(UTC)
        async with failing_writes(store, "53100"):  # disk full
            failed = await scheduler.tick(first)
        assert failed.error is not None and "DiskFull" in failed.error
        # another replica's tick at the next scheduled time runs: the lease did not outlive the failure
        standby = Scheduler(settings, store, opened, Health())
        standby.replica, standby.commands = "standby:1", scheduler.commands
        after = await standby.tick(first + timedelta(seconds=5))
        assert (after.skipped, after.error) == (None, None)
    finally:
        await opened.close()

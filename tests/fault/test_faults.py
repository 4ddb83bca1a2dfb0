"""Outages of the real services and failing E2B: killed processes, restarted RabbitMQ and PostgreSQL.

Each test checks the one promise that matters under its fault: nothing is lost
(every confirmed event ends in its row, every idle sandbox ends paused) and no
sandbox in use is ever paused. RabbitMQ and PostgreSQL are the machine's own;
``helpers.services`` stops and starts them, the ``outage`` fixture makes sure
they serve again when a test ends, whatever happened in it, and the ``outage``
marker keeps every other test off them meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import asyncpg
import orjson
import pytest

from consumer.broker import Broker, Names, message
from consumer.health import Health
from consumer.scheduler import Scheduler
from consumer.settings import Settings
from consumer.store import Store
from e2b_emulator import Emulator, Faults

from ..helpers.amqp import consumers, declare, publish, publish_confirmed, publish_fresh, ready, take_all
from ..helpers.config import AMQP_URL, DATABASE_URL
from ..helpers.database import fresh_count, fresh_states, settle, states
from ..helpers.events import ago, event, expected_rows, ids
from ..helpers.metrics import sample, scrape
from ..helpers.pipeline import ingest, seed, tick_with_ingest
from ..helpers.processes import Proc, Spawn, autopause, e2b_env, free_port, isolated_env
from ..helpers.proxies import LaggingLink, database_address, database_url_via
from ..helpers.services import (
    ensure_postgres,
    ensure_rabbitmq,
    postgres_down,
    rabbitmq_down,
    restart_postgres,
)
from ..helpers.waiting import wait_for, wait_until_equal

# processes -----------------------------------------------------------------


@dataclass
class Supervised:
    """One role process, started again whenever it exits, as systemd or Kubernetes would."""

    spawn: Spawn
    name: str
    args: list[str]
    env: dict[str, str]
    exits: list[int] = field(default_factory=list)
    proc: Proc | None = None

    def start(self) -> Supervised:
        self.proc = self.spawn(self.args, self.env, self.name)
        return self

    def poll(self) -> None:
        assert self.proc is not None
        code = self.proc.popen.poll()
        if code is not None:
            self.exits.append(code)
            self.start()

    @property
    def running(self) -> Proc:
        assert self.proc is not None, f"{self.name} was never started"
        return self.proc

    def output(self) -> str:
        return self.running.output(1_000_000)

    async def watch(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.poll()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.2)


@contextlib.asynccontextmanager
async def supervised(spawn: Spawn, env: dict[str, str], *roles: str) -> AsyncIterator[list[Supervised]]:
    """Each role as a process of its own, started again whenever it exits, while the block runs."""
    started = [Supervised(spawn, role, autopause("run", role), env).start() for role in roles]
    stop = asyncio.Event()
    watchers = [asyncio.create_task(p.watch(stop), name=f"supervisor-{p.name}") for p in started]
    try:
        yield started
    finally:
        stop.set()
        await asyncio.gather(*watchers)


async def assert_rode_it_out(role: Supervised) -> None:
    """The same process lived through the outage (the supervisor is only a safety net), and stops cleanly."""
    assert role.exits == [], (role.exits, role.output()[-4000:])
    assert role.running.alive(), role.output()[-4000:]
    assert await role.running.stop() == 0, role.output()[-4000:]


@pytest.fixture
async def names(settings: Settings) -> Names:
    """The test's topology, declared through a connection of its own; its names."""
    await declare(settings)
    return Names(settings.topology_prefix)


def outages_logged(role: Supervised) -> int:
    return role.output().count(f"{role.name}.outage")


@pytest.fixture
async def outage(request: pytest.FixtureRequest, settings: Settings) -> AsyncIterator[None]:
    """Whatever a test does to RabbitMQ and PostgreSQL, both serve again when it ends.

    It depends on ``settings`` so that it ends first: the schema and the queues
    of the test are removed after the services are back. The test holds the
    services alone (its ``outage`` marker), so no other test meets the outage.
    """
    assert request.node.get_closest_marker("outage"), "a test that stops the services is marked outage"
    try:
        yield
    finally:
        await ensure_rabbitmq()
        await ensure_postgres()


# the producer -----------------------------------------------------------------


class Publisher:
    """An app service: sandbox events in paced chunks, until told to stop.

    Only confirmed events count. A chunk that is not confirmed (the broker went
    away) is published again, same event ids, until it is, as an at-least-once
    producer does; an event that got through unconfirmed and then again is a
    duplicate, which the service absorbs.
    """

    def __init__(
        self, settings: Settings, *, seed: int, sandboxes: int = 2000, chunk: int = 100, pace: float = 0.05
    ) -> None:
        self.exchange_name = Names(settings.topology_prefix).events_exchange
        self.rng = random.Random(seed)
        self.sandboxes = sandboxes
        self.chunk = chunk
        self.pace = pace
        self.confirmed: list[dict[str, Any]] = []
        self.chunks = 0
        self.failed_attempts = 0

    def _next_chunk(self) -> list[dict[str, Any]]:
        rng, bodies = self.rng, []
        for _ in range(self.chunk):
            sid = f"sbx-{rng.randrange(self.sandboxes):06d}"
            roll = rng.random()
            if roll < 0.05 and self.confirmed:
                bodies.append(rng.choice(self.confirmed))  # a redelivery
            elif roll < 0.30:
                bodies.append(event("created", sid, at=ago(rng.uniform(2000, 3000))))
            elif roll < 0.98:
                bodies.append(event("activity", sid, at=ago(rng.uniform(0, 2900))))
            else:
                bodies.append(event("killed", sid, at=ago(rng.uniform(0, 100))))
        return bodies

    async def run(self, stop: asyncio.Event) -> None:
        connection = await aio_pika.connect_robust(AMQP_URL)
        try:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.get_exchange(self.exchange_name, ensure=False)
            while not stop.is_set():
                bodies = self._next_chunk()
                while True:
                    try:
                        items = [(b["type"], message(orjson.dumps(b))) for b in bodies]
                        await asyncio.wait_for(publish_confirmed(exchange, items), 10)
                        break
                    except Exception:
                        self.failed_attempts += 1
                        await asyncio.sleep(0.5)  # the producer's own retry pace
                self.confirmed += bodies
                self.chunks += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.pace)
        finally:
            with contextlib.suppress(Exception):
                await connection.close()

    async def published_more(self, chunks: int, timeout: float = 60) -> None:
        """Wait until ``chunks`` more chunks are confirmed."""
        target = self.chunks + chunks

        async def reached() -> bool:
            return self.chunks >= target

        await wait_for(reached, timeout=timeout, what=f"{chunks} more confirmed chunks")


@contextlib.asynccontextmanager
async def publishing(publisher: Publisher) -> AsyncIterator[Publisher]:
    stop = asyncio.Event()
    task = asyncio.create_task(publisher.run(stop), name="publisher")
    try:
        yield publisher
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


def ingest_env(settings: Settings) -> dict[str, str]:
    return isolated_env(settings, AUTOPAUSE_BATCH_SIZE="200", AUTOPAUSE_FLUSH_INTERVAL="0.05")


# ingest ---------------------------------------------------------------------


async def test_sigkill_at_random_moments_under_load_loses_no_event(
    settings: Settings, names: Names, spawn: Spawn, names_seed: str
) -> None:
    seed = int(names_seed, 16)
    rng = random.Random(seed)
    env = ingest_env(settings)
    rows_at_kill: list[int] = []
    async with publishing(Publisher(settings, seed=seed)) as publisher:
        await publisher.published_more(5)
        for round_ in range(6):
            proc = spawn(autopause("run", "ingest"), env, "ingest")
            if round_ == 0:
                await wait_for(lambda: fresh_count(settings), timeout=60, what="the first committed batch")
            await asyncio.sleep(rng.uniform(0.3, 2.5))  # the random moment of the kill
            assert proc.alive(), proc.output()
            proc.kill()
            rows_at_kill.append(await fresh_count(settings))
        await publisher.published_more(5)

    final = spawn(autopause("run", "ingest", "--burst"), env, "ingest-burst")
    assert await final.wait(180) == 0, final.output()
    await settle(settings, expected_rows(publisher.confirmed), 10, f"after the kills (seed {seed})")
    assert await ready(names.events_queue) == 0
    assert await ready(names.events_dlq) == 0
    assert rows_at_kill[0] > 0, rows_at_kill  # the first kill came after a commit, with more to come


@pytest.mark.outage
async def test_rabbitmq_restart_during_ingest_loses_nothing_and_ingest_recovers_by_itself(
    settings: Settings, names: Names, spawn: Spawn, outage: None, names_seed: str
) -> None:
    async with supervised(spawn, ingest_env(settings), "ingest") as (ingest,):
        async with publishing(Publisher(settings, seed=int(names_seed, 16))) as publisher:
            await wait_for(lambda: fresh_count(settings), timeout=60, what="the first committed batch")
            before = publisher.failed_attempts
            async with rabbitmq_down():
                await wait_for(
                    lambda: publisher.failed_attempts > before, what="the producer to feel the outage"
                )
            await publisher.published_more(20)
        await settle(settings, expected_rows(publisher.confirmed), 120, "after the broker restart")
        assert await ready(names.events_queue) == 0
    # the same process rode the outage out on its robust connection
    assert "broker.resubscribe" in ingest.output()
    await assert_rode_it_out(ingest)
    assert await ready(names.events_queue) == 0  # every event was acked, none waits for redelivery
    assert await ready(names.events_dlq) == 0


@pytest.mark.outage
async def test_rabbitmq_restart_with_a_batch_in_hand_ingest_recovers_by_itself(
    settings: Settings, names: Names, spawn: Spawn, outage: None
) -> None:
    # a long flush interval: the batch is certainly in hand when the broker goes away
    env = isolated_env(
        settings,
        AUTOPAUSE_BATCH_SIZE="5000",
        AUTOPAUSE_PREFETCH="5000",
        AUTOPAUSE_FLUSH_INTERVAL="20",
    )
    proc = spawn(autopause("run", "ingest"), env, "ingest")
    bodies = [event("created", f"held-{i:04d}", at=ago(100)) for i in range(300)]

    async def consuming() -> bool:
        return "ingest.start" in proc.output()

    await wait_for(consuming, timeout=60, what="ingest consuming")
    await publish_fresh(settings, bodies)
    await wait_until_equal(lambda: ready(names.events_queue), 0, timeout=30, what="the batch delivered")
    assert await fresh_count(settings) == 0  # delivered, held, not yet written
    async with rabbitmq_down():
        pass
    await settle(settings, expected_rows(bodies), 90, "the held batch")
    assert proc.alive(), proc.output()
    assert await proc.stop() == 0, proc.output()
    assert await ready(names.events_queue) == 0


@pytest.mark.outage
async def test_postgres_restarts_during_ingest_lose_nothing_and_ingest_waits_them_out(
    settings: Settings, names: Names, spawn: Spawn, outage: None, names_seed: str
) -> None:

    async def committing_again() -> None:
        committed = await fresh_count(settings)
        await wait_for(
            lambda: _more_rows(settings, committed),
            timeout=60,
            what="ingest to commit again after the outage",
        )

    async with (
        supervised(spawn, ingest_env(settings), "ingest") as (ingest,),
        publishing(Publisher(settings, seed=int(names_seed, 16))) as publisher,
    ):
        await wait_for(lambda: fresh_count(settings), timeout=60, what="the first committed batch")
        await restart_postgres()
        await publisher.published_more(10)
        await committing_again()
        async with postgres_down():  # a longer outage: batches are held, nothing is acked
            seen = outages_logged(ingest)
            await wait_for(lambda: outages_logged(ingest) > seen, what="ingest waiting out the outage")
            await publisher.published_more(5)
        await publisher.published_more(20)
        await committing_again()
    await settle(settings, expected_rows(publisher.confirmed), 120, "after the Postgres restarts")
    assert await ready(names.events_queue) == 0
    assert outages_logged(ingest), "the outages went unnoticed"
    await assert_rode_it_out(ingest)
    assert await ready(names.events_queue) == 0
    assert await ready(names.events_dlq) == 0


async def _more_rows(settings: Settings, than: int) -> bool:
    return await fresh_count(settings) > than


async def terminate_idle_backends(ports: set[int]) -> int:
    """What a restart does to each idle pooled session: FATAL "terminating connection", then the close.

    Behind a ``LaggingLink`` the close comes two seconds after the FATAL, so the
    next batch certainly meets a pooled session in that state, which a real
    restart produces only now and then.
    """
    conn = await asyncpg.connect(DATABASE_URL)
    try:
        return int(
            await conn.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE client_port = ANY($1) AND state = 'idle'",
                sorted(ports),
            )
        )
    finally:
        await conn.close()


async def test_postgres_dropping_its_sessions_never_stops_ingest(
    settings: Settings, names: Names, spawn: Spawn, names_seed: str
) -> None:
    link = LaggingLink(*database_address(), lag=2.0)
    port = await link.start()
    env = ingest_env(settings)
    env["AUTOPAUSE_DATABASE_URL"] = database_url_via(port)
    proc = spawn(autopause("run", "ingest"), env, "ingest")
    try:
        async with publishing(Publisher(settings, seed=int(names_seed, 16))) as publisher:
            await wait_for(lambda: fresh_count(settings), timeout=60, what="the first committed batch")

            async def terminated() -> int:
                assert proc.alive(), proc.output()
                return await terminate_idle_backends(link.upstream_ports)

            for _ in range(3):
                await wait_for(terminated, timeout=30, what="an idle pooled session to terminate")
                await publisher.published_more(10)
                assert proc.alive(), proc.output()
        await settle(settings, expected_rows(publisher.confirmed), 60, "after the sessions were dropped")
        assert proc.alive(), proc.output()
        assert await proc.stop() == 0, proc.output()
        assert await ready(names.events_queue) == 0
    finally:
        await link.close()


# pausing ----------------------------------------------------------------------


@pytest.fixture
def pause_settings(pause_settings: Settings) -> Settings:
    return pause_settings.model_copy(update={"retry_max_delay": 0.2})


@pytest.mark.outage
async def test_rabbitmq_restart_during_pausing_scheduler_and_worker_recover(
    pause_settings: Settings, emulator: Emulator, spawn: Spawn, outage: None
) -> None:
    idle, active = ids("idle", 240), ids("busy", 30)
    await seed(pause_settings, emulator, idle=idle, active=active)
    emulator.faults.latency = 0.05
    env = isolated_env(
        pause_settings,
        **e2b_env(emulator.url),
        AUTOPAUSE_TICK_CRON="* * * * * *",
        AUTOPAUSE_CLAIM_MAX_SHARE="1",
        AUTOPAUSE_CLAIM_HARD_CAP="12",  # about 12 claims a second: pausing lasts ~20 s
        AUTOPAUSE_PAUSE_LEASE="8",  # a command lost with the broker is sent again soon
        AUTOPAUSE_E2B_REQUEST_TIMEOUT="1",  # ... which a lease of 8 s must leave room for
        AUTOPAUSE_PAUSE_MAX_ATTEMPTS="1",
        AUTOPAUSE_WORKER_CONCURRENCY="8",
        AUTOPAUSE_RETRY_BASE_DELAY="0.05",
        AUTOPAUSE_RETRY_MAX_DELAY="0.5",
    )

    async def paused(n: int) -> bool:
        return Counter((await fresh_states(pause_settings)).values())["PAUSED"] >= n

    async def all_paused() -> bool:
        rows = await fresh_states(pause_settings)
        return all(rows.get(s) == "PAUSED" for s in idle)

    async with supervised(spawn, env, "ingest", "scheduler", "worker") as (_, scheduler, worker):
        await wait_for(lambda: paused(30), timeout=60, what="pausing under way")
        async with rabbitmq_down():
            pass
        assert not await paused(len(idle)), "pausing was over before the broker came back"
        await wait_for(all_paused, timeout=150, what="every idle sandbox paused after the restart")

    rows = await fresh_states(pause_settings)
    assert {rows[s] for s in active} == {"RUNNING"}
    assert {emulator.state_of(s) for s in idle} == {"paused"}
    assert {emulator.state_of(s) for s in active} == {"running"}
    assert not [c for c in emulator.calls("pause") if c.sandbox_id in set(active)]
    # both roles rode the outage out on their robust connections
    for role in (scheduler, worker):
        await assert_rode_it_out(role)
    assert await ready(Names(pause_settings.topology_prefix).pause_queue) == 0


@pytest.mark.outage
async def test_a_tick_during_a_broker_outage_fails_softly(
    settings: Settings, names: Names, store: Store, outage: None
) -> None:
    opened = await Broker.connect(settings, "scheduler")
    try:
        scheduler = Scheduler(settings, store, opened, Health())
        scheduler.commands = await opened.publisher(opened.names.commands_exchange, confirm=True)
        assert (await scheduler.tick(datetime.now(UTC))).error is None
        # a sandbox falls due: the next tick must ask the broker whether ingest keeps up
        async with store.pool.acquire() as conn:
            await conn.execute(
                "INSERT INTO sandbox_sessions (sandbox_id, state, last_activity, pause_due_at)"
                " VALUES ('due-1', 'RUNNING', now() - interval '1 hour', now() - interval '1 minute')"
            )
        async with rabbitmq_down():
            result = await scheduler.tick(datetime.now(UTC) + timedelta(minutes=1))
        assert result.error is not None and "RabbitMQ unavailable" in result.error
        recorded = await store.last_tick()
        assert recorded is not None and recorded.error == result.error
    finally:
        await opened.close()


async def test_a_failing_e2b_still_ends_with_every_idle_sandbox_paused_within_the_rate(
    pause_settings: Settings, store: Store, emulator: Emulator, spawn: Spawn
) -> None:
    idle, active, late = ids("flaky", 300), ids("busy", 30), ids("late", 20)
    await seed(pause_settings, emulator, idle=idle + late, active=active)
    await tick_with_ingest(pause_settings)
    # the late ones were claimed, then used again before the worker got to them
    await publish_fresh(pause_settings, [event("activity", sid) for sid in late])
    await ingest(pause_settings)
    assert {(await states(store))[s] for s in late} == {"RUNNING"}

    rate = 60.0
    # 20% 5xx, 5% hung calls; 429 once the admitted calls of the last second reach
    # 90% of the worker's rate, which turns away about a tenth of its calls
    emulator.faults = Faults(error_rate=0.2, timeout_rate=0.05, rate_limit=rate * 0.9)
    env = isolated_env(
        pause_settings,
        **e2b_env(emulator.url),
        AUTOPAUSE_E2B_RATE_LIMIT=str(rate),
        AUTOPAUSE_E2B_REQUEST_TIMEOUT="1",
        AUTOPAUSE_WORKER_CONCURRENCY="32",
        AUTOPAUSE_PAUSE_MAX_ATTEMPTS="40",
        AUTOPAUSE_RETRY_BASE_DELAY="0.01",
        AUTOPAUSE_RETRY_MAX_DELAY="0.2",
    )
    # a process of its own, so that the emulator's clock sees the worker's pace undisturbed
    worker = spawn(autopause("run", "worker", "--burst"), env, "worker")
    assert await worker.wait(240) == 0, worker.output()

    rows = await states(store)
    assert {s for s in idle if rows[s] != "PAUSED"} == set()
    assert {rows[s] for s in active + late} == {"RUNNING"}
    assert {emulator.state_of(s) for s in idle} == {"paused"}
    assert {emulator.state_of(s) for s in active + late} == {"running"}
    calls = emulator.calls("pause")
    assert not [c for c in calls if c.sandbox_id in set(active + late)]
    statuses = Counter(c.status for c in calls)
    assert statuses[0] > 0 and statuses[500] + statuses[502] + statuses[503] > 0, statuses
    assert 0.03 <= statuses[429] / len(calls) <= 0.25, statuses
    capacity = max(1.0, rate / 10)
    peaks = {w: emulator.peak_rate("pause", window=w) for w in (1.0, 5.0)}
    assert peaks[1.0] <= rate + capacity + 1, (peaks, statuses)
    assert peaks[5.0] <= 5 * rate + capacity + 1, (peaks, statuses)


@pytest.mark.outage
async def test_sigterm_while_postgres_is_down_loses_no_event(
    settings: Settings, store: Store, channel: aio_pika.abc.AbstractChannel, spawn: Spawn, outage: None
) -> None:
    names = Names(settings.topology_prefix)
    port = free_port()
    env = isolated_env(settings, AUTOPAUSE_METRICS_PORT=str(port), AUTOPAUSE_FLUSH_INTERVAL="0.05")
    proc = spawn(autopause("run", "ingest"), env, "ingest")

    async def unsettled() -> float:
        return sample(await scrape(port) or "", "autopause_ingest_unsettled")

    await wait_for(lambda: consumers(channel, names.events_queue), timeout=30, what="ingest consuming")
    async with postgres_down():
        await publish(channel, settings, [event("created", "sbx-kept")])
        await wait_until_equal(unsettled, 1, what="the valid event held")
        await publish(channel, settings, [b"{not json"])
        await wait_until_equal(unsettled, 2, what="the invalid one in hand")
        assert await proc.stop() == 0, proc.output()
    again = spawn(
        autopause("run", "ingest", "--burst"), env | {"AUTOPAUSE_METRICS_PORT": "0"}, "ingest-burst"
    )
    assert await again.wait(120) == 0, again.output()
    assert await states(store) == {"sbx-kept": "RUNNING"}
    assert [m.body for m in await take_all(channel, names.events_dlq)] == [b"{not json"]

"""Faults on the real services: killed processes, a restarted RabbitMQ and PostgreSQL, a failing E2B.

Each test checks the one promise that matters under its fault: nothing is lost
(every confirmed event ends in its row, every idle sandbox ends paused) and no
sandbox in use is ever paused. RabbitMQ and PostgreSQL are the machine's own;
``services`` stops and starts them, and the ``outage`` fixture makes sure they
serve again when a test ends, whatever happened in it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import orjson
import pytest
from conftest import (
    AMQP_URL,
    DATABASE_URL,
    ROOT,
    ago,
    arrived_long_ago,
    autopause,
    event,
    isolated_env,
    publish_confirmed,
    wait_for,
)
from services import (
    LaggingLink,
    ensure_postgres,
    ensure_rabbitmq,
    postgres_down,
    rabbitmq_down,
    restart_postgres,
)
from test_ingest import expected_rows
from test_pause import KEY, ids, states, tick

from consumer import runner
from consumer.broker import Broker, Names, declare_topology, message
from consumer.health import Health
from consumer.scheduler import Scheduler
from consumer.settings import Settings
from consumer.store import Store
from e2b_emulator import Emulator, Faults

pytestmark = pytest.mark.fault

Rows = dict[str, tuple[str, datetime]]


# processes -----------------------------------------------------------------


@dataclass
class Proc:
    """An autopause subprocess whose output goes to a file (a pipe would fill up and stall it)."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self, tail: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-tail:]

    async def wait(self, timeout: float) -> int:
        return await asyncio.to_thread(self.popen.wait, timeout)

    async def stop(self, timeout: float = 60) -> int:
        """SIGTERM, as a supervisor stops a process; its exit code."""
        self.popen.send_signal(signal.SIGTERM)
        return await self.wait(timeout)

    def kill(self) -> None:
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(timeout=10)


Launch = Callable[[str, list[str], dict[str, str]], Proc]


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Launch]:
    """Start autopause subprocesses; any still running at the end are killed."""
    started: list[Proc] = []

    def start(name: str, args: list[str], env: dict[str, str]) -> Proc:
        log = tmp_path / f"{name}-{len(started)}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(args, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        proc = Proc(name, popen, log)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.alive():
            proc.popen.kill()
        proc.popen.wait(timeout=10)


@dataclass
class Supervised:
    """One role process, started again whenever it exits, as systemd or Kubernetes would."""

    launch: Launch
    name: str
    args: list[str]
    env: dict[str, str]
    exits: list[int] = field(default_factory=list)
    proc: Proc | None = None

    def start(self) -> Supervised:
        self.proc = self.launch(self.name, self.args, self.env)
        return self

    def poll(self) -> None:
        assert self.proc is not None
        code = self.proc.popen.poll()
        if code is not None:
            self.exits.append(code)
            self.start()

    async def watch(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.poll()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.2)


@pytest.fixture
async def outage(settings: Settings) -> AsyncIterator[None]:
    """Whatever a test does to RabbitMQ and PostgreSQL, both serve again when it ends.

    It depends on ``settings`` so that it ends first: the schema and the queues
    of the test are removed after the services are back.
    """
    try:
        yield
    finally:
        await ensure_rabbitmq()
        await ensure_postgres()


# broker and database, through fresh connections (a restart breaks the long-lived ones)


async def declare(settings: Settings) -> None:
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        await declare_topology(await connection.channel(), settings)


async def publish_fresh(settings: Settings, bodies: list[dict[str, Any]]) -> None:
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await declare_topology(channel, settings)
        exchange = await channel.get_exchange(Names(settings.topology_prefix).events_exchange)
        await publish_confirmed(exchange, ((b["type"], message(orjson.dumps(b))) for b in bodies))


async def ready(name: str) -> int | None:
    """Messages ready in a queue, or None while the broker does not answer."""
    try:
        connection = await aio_pika.connect(AMQP_URL, timeout=5)
    except Exception:
        return None
    async with connection:
        queue = await (await connection.channel()).declare_queue(name, passive=True)
        return int(queue.declaration_result.message_count or 0)


async def db_rows(settings: Settings) -> Rows | None:
    """sandbox -> (state, last_activity), or None while Postgres does not answer."""
    try:
        conn = await asyncpg.connect(
            DATABASE_URL, timeout=5, server_settings={"search_path": settings.database_schema}
        )
    except Exception:
        return None
    try:
        records = await conn.fetch("SELECT sandbox_id, state, last_activity FROM sandbox_sessions")
    except (asyncpg.UndefinedTableError, asyncpg.PostgresConnectionError, OSError):
        return None
    finally:
        with contextlib.suppress(Exception):
            await conn.close()
    return {r["sandbox_id"]: (r["state"], r["last_activity"]) for r in records}


async def row_count(settings: Settings) -> int:
    return len(await db_rows(settings) or {})


async def settle(settings: Settings, expected: Rows, timeout: float, what: str) -> None:
    """Wait until the table holds exactly ``expected``; fail with a summary of the difference."""
    deadline = time.monotonic() + timeout
    rows = await db_rows(settings)
    while rows != expected and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        rows = await db_rows(settings)
    rows = rows or {}
    missing = sorted(set(expected) - set(rows))
    wrong = sorted(s for s in expected if s in rows and rows[s] != expected[s])
    extra = sorted(set(rows) - set(expected))
    assert rows == expected, (
        f"{what}: {len(missing)} missing (e.g. {missing[:3]}), {len(wrong)} wrong "
        f"(e.g. {[(s, rows[s], expected[s]) for s in wrong[:2]]}), {len(extra)} unexpected"
    )


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
    settings: Settings, launch: Launch, names_seed: str
) -> None:
    seed = int(names_seed, 16)
    rng = random.Random(seed)
    await declare(settings)
    env = ingest_env(settings)
    names = Names(settings.topology_prefix)
    rows_at_kill: list[int] = []
    async with publishing(Publisher(settings, seed=seed)) as publisher:
        await publisher.published_more(5)
        for round_ in range(6):
            proc = launch("ingest", autopause("run", "ingest"), env)
            if round_ == 0:
                await wait_for(lambda: row_count(settings), timeout=60, what="the first committed batch")
            await asyncio.sleep(rng.uniform(0.3, 2.5))  # the random moment of the kill
            assert proc.alive(), proc.output()
            proc.kill()
            rows_at_kill.append(await row_count(settings))
        await publisher.published_more(5)

    final = launch("ingest-burst", autopause("run", "ingest", "--burst"), env)
    assert await final.wait(180) == 0, final.output()
    await settle(settings, expected_rows(publisher.confirmed), 10, f"after the kills (seed {seed})")
    assert await ready(names.events_queue) == 0
    assert await ready(names.events_dlq) == 0
    assert rows_at_kill[0] > 0, rows_at_kill  # the first kill came after a commit, with more to come


async def test_rabbitmq_restart_during_ingest_loses_nothing_and_ingest_recovers_by_itself(
    settings: Settings, launch: Launch, outage: None, names_seed: str
) -> None:
    await declare(settings)
    names = Names(settings.topology_prefix)
    ingest = Supervised(launch, "ingest", autopause("run", "ingest"), ingest_env(settings)).start()
    stop = asyncio.Event()
    watcher = asyncio.create_task(ingest.watch(stop), name="supervisor")
    try:
        async with publishing(Publisher(settings, seed=int(names_seed, 16))) as publisher:
            await wait_for(lambda: row_count(settings), timeout=60, what="the first committed batch")
            before = publisher.failed_attempts
            async with rabbitmq_down():
                await asyncio.sleep(3)  # the outage, while the producer keeps trying
            await publisher.published_more(20)
            assert publisher.failed_attempts > before, "the outage was not felt by the producer"
        await settle(settings, expected_rows(publisher.confirmed), 120, "after the broker restart")
        assert await ready(names.events_queue) == 0
    finally:
        stop.set()
        await watcher
    # the same process rode the outage out on its robust connection: no supervisor needed
    assert ingest.exits == [], (ingest.exits, ingest.proc and ingest.proc.output())
    assert ingest.proc is not None and ingest.proc.alive(), ingest.proc.output()
    assert "broker.resubscribe" in ingest.proc.output(1_000_000)
    assert await ingest.proc.stop() == 0, ingest.proc.output()
    assert await ready(names.events_queue) == 0  # every event was acked, none waits for redelivery
    assert await ready(names.events_dlq) == 0


async def test_rabbitmq_restart_with_a_batch_in_hand_ingest_recovers_by_itself(
    settings: Settings, launch: Launch, outage: None
) -> None:
    await declare(settings)
    names = Names(settings.topology_prefix)
    # a long flush interval: the batch is certainly in hand when the broker goes away
    env = isolated_env(
        settings,
        AUTOPAUSE_BATCH_SIZE="5000",
        AUTOPAUSE_PREFETCH="5000",
        AUTOPAUSE_FLUSH_INTERVAL="20",
    )
    proc = launch("ingest", autopause("run", "ingest"), env)
    bodies = [event("created", f"held-{i:04d}", at=ago(100)) for i in range(300)]

    async def consuming() -> bool:
        return "ingest.start" in proc.output()

    await wait_for(consuming, timeout=60, what="ingest consuming")
    await publish_fresh(settings, bodies)
    await wait_for(lambda: _is(ready(names.events_queue), 0), timeout=30, what="the batch delivered")
    assert await row_count(settings) == 0  # delivered, held, not yet written
    async with rabbitmq_down():
        pass
    await settle(settings, expected_rows(bodies), 90, "the held batch")
    assert proc.alive(), proc.output()
    assert await proc.stop() == 0, proc.output()
    assert await ready(names.events_queue) == 0


async def _is(value: Any, expected: Any) -> bool:
    return bool(await value == expected)


async def test_postgres_restarts_during_ingest_lose_nothing_and_ingest_waits_them_out(
    settings: Settings, launch: Launch, outage: None, names_seed: str
) -> None:
    await declare(settings)
    names = Names(settings.topology_prefix)
    ingest = Supervised(launch, "ingest", autopause("run", "ingest"), ingest_env(settings)).start()
    stop = asyncio.Event()
    watcher = asyncio.create_task(ingest.watch(stop), name="supervisor")

    async def committing_again() -> None:
        committed = await row_count(settings)

        async def grew() -> bool:
            return await row_count(settings) > committed

        await wait_for(grew, timeout=60, what="ingest to commit again after the outage")

    try:
        async with publishing(Publisher(settings, seed=int(names_seed, 16))) as publisher:
            await wait_for(lambda: row_count(settings), timeout=60, what="the first committed batch")
            await restart_postgres()
            await publisher.published_more(10)
            await committing_again()
            async with postgres_down():
                await asyncio.sleep(3)  # a longer outage: batches are held, nothing is acked
            await publisher.published_more(20)
            await committing_again()
        await settle(settings, expected_rows(publisher.confirmed), 120, "after the Postgres restarts")
        assert await ready(names.events_queue) == 0
    finally:
        stop.set()
        await watcher
    # the same process waited both outages out (the supervisor is only a safety net here)
    assert ingest.exits == [], (ingest.exits, ingest.proc and ingest.proc.output())
    assert ingest.proc is not None and ingest.proc.alive(), ingest.proc.output()
    assert "ingest.outage" in ingest.proc.output(1_000_000), "the outages went unnoticed"
    assert await ingest.proc.stop() == 0, ingest.proc.output()
    assert await ready(names.events_queue) == 0
    assert await ready(names.events_dlq) == 0


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
    settings: Settings, launch: Launch, names_seed: str
) -> None:
    link = LaggingLink("127.0.0.1", 5432, lag=2.0)
    port = await link.start()
    await declare(settings)
    names = Names(settings.topology_prefix)
    env = ingest_env(settings)
    env["AUTOPAUSE_DATABASE_URL"] = DATABASE_URL.replace(":5432", f":{port}")
    proc = launch("ingest", autopause("run", "ingest"), env)
    try:
        async with publishing(Publisher(settings, seed=int(names_seed, 16))) as publisher:
            await wait_for(lambda: row_count(settings), timeout=60, what="the first committed batch")

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


async def seed_sessions(
    settings: Settings, emulator: Emulator, *, idle: list[str], active: list[str]
) -> None:
    """Sandboxes in the emulator, their events ingested: idle ones an hour quiet, active ones fresh."""
    bodies = []
    for sid in idle:
        emulator.add_sandbox(sid)
        bodies.append(event("created", sid, at=ago(3600)))
    for sid in active:
        emulator.add_sandbox(sid)
        bodies += [event("created", sid, at=ago(3600)), event("activity", sid)]
    await publish_fresh(settings, bodies)
    assert await runner.run(settings, {"ingest"}, burst=True) == 0
    await arrived_long_ago(settings)


async def fresh_states(settings: Settings) -> dict[str, str]:
    rows = await db_rows(settings)
    return {sid: state for sid, (state, _) in (rows or {}).items()}


async def test_rabbitmq_restart_during_pausing_scheduler_and_worker_recover(
    pause_settings: Settings, emulator: Emulator, launch: Launch, outage: None
) -> None:
    idle, active = ids("idle", 240), ids("busy", 30)
    await seed_sessions(pause_settings, emulator, idle=idle, active=active)
    emulator.faults.latency = 0.05
    env = isolated_env(
        pause_settings,
        AUTOPAUSE_E2B_API_URL=emulator.url,
        AUTOPAUSE_E2B_API_KEY=KEY,
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
    ingest = Supervised(launch, "ingest", autopause("run", "ingest"), env).start()
    scheduler = Supervised(launch, "scheduler", autopause("run", "scheduler"), env).start()
    worker = Supervised(launch, "worker", autopause("run", "worker"), env).start()
    stop = asyncio.Event()
    watchers = [asyncio.create_task(p.watch(stop)) for p in (ingest, scheduler, worker)]

    async def paused(n: int) -> bool:
        return Counter((await fresh_states(pause_settings)).values())["PAUSED"] >= n

    try:
        await wait_for(lambda: paused(30), timeout=60, what="pausing under way")
        async with rabbitmq_down():
            await asyncio.sleep(3)
        assert not await paused(len(idle)), "pausing was over before the broker came back"

        async def all_paused() -> bool:
            rows = await fresh_states(pause_settings)
            return all(rows.get(s) == "PAUSED" for s in idle)

        await wait_for(all_paused, timeout=150, what="every idle sandbox paused after the restart")
    finally:
        stop.set()
        await asyncio.gather(*watchers)

    rows = await fresh_states(pause_settings)
    assert {rows[s] for s in active} == {"RUNNING"}
    assert {emulator.state_of(s) for s in idle} == {"paused"}
    assert {emulator.state_of(s) for s in active} == {"running"}
    assert not [c for c in emulator.calls("pause") if c.sandbox_id in set(active)]
    # both roles rode the outage out on their robust connections
    assert scheduler.exits == [], scheduler.proc and scheduler.proc.output()
    assert worker.exits == [], worker.proc and worker.proc.output()
    for role in (scheduler, worker):
        assert role.proc is not None
        assert await role.proc.stop() == 0, role.proc.output()
    assert await ready(Names(pause_settings.topology_prefix).pause_queue) == 0


async def test_a_tick_during_a_broker_outage_fails_softly(
    settings: Settings, store: Store, outage: None
) -> None:
    await declare(settings)
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
    pause_settings: Settings, store: Store, emulator: Emulator, launch: Launch
) -> None:
    idle, active, late = ids("flaky", 300), ids("busy", 30), ids("late", 20)
    await seed_sessions(pause_settings, emulator, idle=idle + late, active=active)
    await tick(pause_settings)
    # the late ones were claimed, then used again before the worker got to them
    await publish_fresh(pause_settings, [event("activity", sid) for sid in late])
    assert await runner.run(pause_settings, {"ingest"}, burst=True) == 0
    assert {(await states(store))[s] for s in late} == {"RUNNING"}

    rate = 60.0
    # 20% 5xx, 5% hung calls; 429 once the admitted calls of the last second reach
    # 90% of the worker's rate, which turns away about a tenth of its calls
    emulator.faults = Faults(error_rate=0.2, timeout_rate=0.05, rate_limit=rate * 0.9)
    env = isolated_env(
        pause_settings,
        AUTOPAUSE_E2B_API_URL=emulator.url,
        AUTOPAUSE_E2B_API_KEY=KEY,
        AUTOPAUSE_E2B_RATE_LIMIT=str(rate),
        AUTOPAUSE_E2B_REQUEST_TIMEOUT="1",
        AUTOPAUSE_WORKER_CONCURRENCY="32",
        AUTOPAUSE_PAUSE_MAX_ATTEMPTS="40",
        AUTOPAUSE_RETRY_BASE_DELAY="0.01",
        AUTOPAUSE_RETRY_MAX_DELAY="0.2",
    )
    # a process of its own, so that the emulator's clock sees the worker's pace undisturbed
    worker = launch("worker", autopause("run", "worker", "--burst"), env)
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

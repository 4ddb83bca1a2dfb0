"""The ingest role on the real RabbitMQ and Postgres."""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
from datetime import datetime
from typing import Any

import aio_pika
import orjson
import pytest
from conftest import (
    DATABASE_URL,
    ago,
    autopause,
    event,
    isolated_env,
    publish,
    queue_ready,
    wait_for,
)
from tcpproxy import Proxy

from consumer import runner
from consumer.broker import REASON_HEADER, Names
from consumer.ingest import Rejected, parse
from consumer.migrate import bundled_migrations
from consumer.settings import Settings
from consumer.store import Store


def expected_rows(events: list[dict[str, Any]]) -> dict[str, tuple[str, datetime]]:
    """sandbox -> (state, last_activity) that the events must produce, computed independently."""
    rows: dict[str, tuple[str, datetime]] = {}
    for body in events:
        at = datetime.fromisoformat(body["occurred_at"])
        state, last = rows.get(body["sandbox_id"], ("RUNNING", at))
        if body["type"] == "sandbox.killed":
            state = "KILLED"
        rows[body["sandbox_id"]] = (state, max(last, at))
    return rows


def traffic(sandboxes: int, seed: int = 7) -> list[dict[str, Any]]:
    """created + several activities (+ some kills) per sandbox, shuffled, with duplicates."""
    rng = random.Random(seed)
    events: list[dict[str, Any]] = []
    for i in range(sandboxes):
        sid = f"sbx-{i:06d}"
        events.append(event("created", sid, at=ago(3000)))
        for _ in range(3):
            events.append(event("activity", sid, at=ago(rng.uniform(0, 2900))))
        if i % 10 == 0:
            events.append(event("killed", sid, at=ago(rng.uniform(0, 100))))
    events += rng.sample(events, len(events) // 20)  # redeliveries
    rng.shuffle(events)
    return events


async def rows_of(store: Store) -> dict[str, tuple[str, datetime]]:
    async with store.pool.acquire() as conn:
        records = await conn.fetch("SELECT sandbox_id, state, last_activity FROM sandbox_sessions")
    return {r["sandbox_id"]: (r["state"], r["last_activity"]) for r in records}


async def count_rows(store: Store) -> int:
    async with store.pool.acquire() as conn:
        return int(await conn.fetchval("SELECT count(*) FROM sandbox_sessions"))


INVALID: list[tuple[bytes, str]] = [
    (b"{not json", "invalid_json"),
    (b"\xff\xfe\x00garbage", "invalid_json"),
    (b"[1, 2, 3]", "not_an_object"),
    (orjson.dumps({"type": "sandbox.exploded", "sandbox_id": "sbx-1"}), "unknown_type"),
    (orjson.dumps({"sandbox_id": "sbx-1"}), "missing_type"),
    (orjson.dumps({**event("activity", "sbx-1"), "source": "telepathy"}), "invalid_event"),
    (orjson.dumps({**event("activity", "sbx-1"), "extra": 1}), "invalid_event"),
    (orjson.dumps(event("activity", "Robert'); DROP TABLE sandbox_sessions;--")), "invalid_event"),
    (orjson.dumps(event("activity", "sbx-1", at=ago(-86_400))), "invalid_event"),
    (
        orjson.dumps({**event("activity", "sbx-1"), "occurred_at": "2026-01-01T00:00:00"}),
        "invalid_event",
    ),
    (orjson.dumps({**event("created", "sbx-1"), "metadata": {"k": "v" * 20_000}}), "too_large"),
]


def test_parse_names_the_reason_of_each_invalid_message() -> None:
    for body, reason in INVALID:
        parsed = parse(body, limit=16_384, context={})
        assert isinstance(parsed, Rejected), body
        assert parsed.reason == reason, (body[:60], parsed)


async def test_mixed_events_end_as_rows_and_the_invalid_ones_as_dead_letters(
    settings: Settings, store: Store, channel: aio_pika.abc.AbstractChannel
) -> None:
    valid = traffic(700)
    invalid = [body for body, _ in INVALID] * 20
    mixed: list[dict[str, Any] | bytes] = [*valid, *invalid]
    random.Random(3).shuffle(mixed)
    await publish(channel, settings, mixed)
    assert len(valid) > 2500

    assert await runner.run(settings, {"ingest"}, burst=True) == 0

    names = Names(settings.topology_prefix)
    assert await queue_ready(channel, names.events_queue) == 0
    assert await rows_of(store) == expected_rows(valid)
    dead = await channel.get_queue(names.events_dlq)
    reasons: dict[str, int] = {}
    while (msg := await dead.get(fail=False, no_ack=True)) is not None:
        assert msg.headers is not None
        reason = str(msg.headers[REASON_HEADER])
        reasons[reason] = reasons.get(reason, 0) + 1
    expected: dict[str, int] = {}
    for _, reason in INVALID:
        expected[reason] = expected.get(reason, 0) + 20
    assert reasons == expected


async def test_transitions_are_logged_for_every_change_of_state(
    settings: Settings, store: Store, channel: aio_pika.abc.AbstractChannel
) -> None:
    await publish(channel, settings, [event("created", "sbx-log", at=ago(10)), event("killed", "sbx-log")])
    assert await runner.run(settings, {"ingest"}, burst=True) == 0
    history = [(r.from_state, r.to_state, r.actor) for r in await store.transitions_of("sbx-log")]
    assert history == [(None, "RUNNING", "ingest"), ("RUNNING", "KILLED", "ingest")]


async def test_sigkill_in_the_middle_of_a_batch_loses_nothing(
    settings: Settings, store: Store, channel: aio_pika.abc.AbstractChannel, spawn: Any
) -> None:
    events = traffic(5000, seed=11)
    await publish(channel, settings, list(events))
    env = isolated_env(settings, AUTOPAUSE_BATCH_SIZE="200", AUTOPAUSE_FLUSH_INTERVAL="0.05")
    proc = spawn(autopause("run", "ingest"), env)
    await wait_for(lambda: count_rows(store), timeout=60, what="the first committed batch")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    assert len(await rows_of(store)) < len(expected_rows(events)), "killed too late to test anything"

    again = spawn(autopause("run", "ingest", "--burst"), env)
    assert again.wait(timeout=120) == 0
    assert await rows_of(store) == expected_rows(events)
    assert await queue_ready(channel, Names(settings.topology_prefix).events_queue) == 0


async def test_sigterm_exits_zero_and_loses_nothing(
    settings: Settings, store: Store, channel: aio_pika.abc.AbstractChannel, spawn: Any
) -> None:
    events = traffic(5000, seed=12)
    await publish(channel, settings, list(events))
    env = isolated_env(settings, AUTOPAUSE_BATCH_SIZE="200")
    proc = spawn(autopause("run", "ingest"), env)
    await wait_for(lambda: count_rows(store), timeout=60, what="the first committed batch")
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait, 30) == 0
    output = proc.log.read_text()
    assert "ingest.stop" in output

    names = Names(settings.topology_prefix)
    assert await queue_ready(channel, names.events_dlq) == 0
    # what the stopped process did not take is still queued; a second run finishes it
    again = await asyncio.to_thread(
        subprocess.run, autopause("run", "ingest", "--burst"), env=env, timeout=120, capture_output=True
    )
    assert again.returncode == 0, again.stdout
    assert await rows_of(store) == expected_rows(events)


async def test_database_outage_holds_the_batch_and_resumes(
    settings: Settings, store: Store, channel: aio_pika.abc.AbstractChannel
) -> None:
    proxy = Proxy("127.0.0.1", 5432)
    port = await proxy.start()
    through_proxy = settings.model_copy(
        update={"database_url": type(settings.database_url)(DATABASE_URL.replace(":5432", f":{port}"))}
    )
    task = asyncio.create_task(runner.run(through_proxy, {"ingest"}))
    first = [event("created", f"sbx-a{i}") for i in range(50)]
    await publish(channel, settings, list(first))
    await wait_for(lambda: count_rows(store), what="rows before the outage")
    await wait_for(lambda: _equals(count_rows(store), 50), what="all first rows")

    await proxy.cut()
    second = [event("created", f"sbx-b{i}") for i in range(50)]
    await publish(channel, settings, list(second))
    names = Names(settings.topology_prefix)
    events_queue = await channel.get_queue(names.events_queue)

    async def held_unacked() -> bool:
        declared = await channel.declare_queue(names.events_queue, passive=True)
        return declared.declaration_result.message_count == 0  # delivered to ingest, not acked

    await wait_for(held_unacked, what="the second batch delivered and held")
    assert await count_rows(store) == 50
    await proxy.restore()
    await wait_for(lambda: _equals(count_rows(store), 100), timeout=60, what="ingest to resume")
    assert await rows_of(store) == expected_rows(first + second)
    assert events_queue is not None
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await proxy.cut()


async def _equals(value: Any, expected: int) -> bool:
    return bool(await value == expected)


def test_invalid_settings_fail_at_start_naming_the_setting() -> None:
    env = {"AUTOPAUSE_BATCH_SIZE": "0", "PATH": "/usr/bin:/bin"}
    result = subprocess.run(autopause("run", "ingest"), env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "AUTOPAUSE_BATCH_SIZE" in result.stderr
    assert "Traceback" not in result.stderr


async def test_replicas_migrating_at_once_apply_each_migration_once(settings: Settings) -> None:
    stores = [
        await Store.connect(settings.database_url.get_secret_value(), settings.database_schema, size=2)
        for _ in range(5)
    ]
    try:
        results = await asyncio.gather(*(s.migrate() for s in stores))
        async with stores[0].pool.acquire() as conn:
            versions = await conn.fetch("SELECT version FROM autopause_migrations")
    finally:
        for s in stores:
            await s.close()
    assert sorted(len(r) for r in results)[:-1] == [0, 0, 0, 0]
    assert sorted(len(r) for r in results)[-1] == len(bundled_migrations())
    assert [r["version"] for r in versions] == [m.version for m in bundled_migrations()]


async def test_an_event_postgres_refuses_is_dead_lettered_and_its_batch_applied(
    settings: Settings, store: Store, channel: aio_pika.abc.AbstractChannel
) -> None:
    # a constraint stands in for any refusal by the database that validation could not foresee
    async with store.pool.acquire() as conn:
        await conn.execute(
            "ALTER TABLE sandbox_sessions ADD CONSTRAINT no_poison CHECK (sandbox_id <> 'sbx-poison')"
        )
    neighbours = [event("created", f"sbx-ok{i:03d}", at=ago(60)) for i in range(40)]
    await publish(channel, settings, [*neighbours[:17], event("created", "sbx-poison"), *neighbours[17:]])
    assert await runner.run(settings, {"ingest"}, burst=True) == 0
    assert await rows_of(store) == expected_rows(neighbours)
    names = Names(settings.topology_prefix)
    dead = await channel.get_queue(names.events_dlq)
    msg = await dead.get(no_ack=True)
    assert msg.headers is not None and msg.headers[REASON_HEADER] == "rejected_by_database"
    assert b"sbx-poison" in msg.body
    assert await dead.get(fail=False) is None
    assert await queue_ready(channel, names.events_queue) == 0

"""The ingest role on the real RabbitMQ and Postgres: rows, transitions, dead letters, migrations."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from typing import Any

import aio_pika

from consumer.broker import REASON_HEADER, Names
from consumer.migrate import bundled_migrations
from consumer.settings import Settings
from consumer.store import Store

from ..helpers.amqp import publish, queue_ready, take_all
from ..helpers.database import rows_of
from ..helpers.events import ago, event, expected_rows, traffic
from ..helpers.hostile import INVALID
from ..helpers.pipeline import ingest


async def test_mixed_events_end_as_rows_and_the_invalid_ones_as_dead_letters(
    settings: Settings, store: Store, channel: aio_pika.abc.AbstractChannel
) -> None:
    valid = traffic(700)
    invalid = [body for body, _ in INVALID] * 20
    mixed: list[dict[str, Any] | bytes] = [*valid, *invalid]
    random.Random(3).shuffle(mixed)
    await publish(channel, settings, mixed)
    assert len(valid) > 2500

    await ingest(settings)

    names = Names(settings.topology_prefix)
    assert await queue_ready(channel, names.events_queue) == 0
    assert await rows_of(store) == expected_rows(valid)
    reasons = Counter(
        (msg.headers or {}).get(REASON_HEADER) for msg in await take_all(channel, names.events_dlq)
    )
    assert reasons == Counter(reason for _, reason in INVALID * 20)


async def test_transitions_are_logged_for_every_change_of_state(
    settings: Settings, store: Store, channel: aio_pika.abc.AbstractChannel
) -> None:
    await publish(channel, settings, [event("created", "sbx-log", at=ago(10)), event("killed", "sbx-log")])
    await ingest(settings)
    history = [(r.from_state, r.to_state, r.actor) for r in await store.transitions_of("sbx-log")]
    assert history == [(None, "RUNNING", "ingest"), ("RUNNING", "KILLED", "ingest")]


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
    await ingest(settings)
    assert await rows_of(store) == expected_rows(neighbours)
    names = Names(settings.topology_prefix)
    dead = await channel.get_queue(names.events_dlq)
    msg = await dead.get(no_ack=True)
    assert msg.headers is not None and msg.headers[REASON_HEADER] == "rejected_by_database"
    assert b"sbx-poison" in msg.body
    assert await dead.get(fail=False) is None
    assert await queue_ready(channel, names.events_queue) == 0

"""The broker refusing a publish, as a full queue does.

An invalid event is never acked before its dead letter is taken; a pause
command that cannot be published releases its claim at once.
"""

from __future__ import annotations

import aio_pika

from consumer.broker import REASON_HEADER, Names
from consumer.settings import Settings
from consumer.store import Store
from e2b_emulator import Emulator

from ..helpers.amqp import publish, queue_ready, refusing_queue, take_all
from ..helpers.database import row, state_of, states, transitions
from ..helpers.events import event, ids
from ..helpers.pipeline import ingest_running, seed, service, tick
from ..helpers.waiting import wait_for


async def test_a_dead_letter_the_broker_refuses_is_never_acked(
    settings: Settings, store: Store, channel: aio_pika.abc.AbstractChannel
) -> None:
    names = Names(settings.topology_prefix)
    async with service(settings, {"ingest"}):
        async with refusing_queue(names.events_dlq):
            await publish(channel, settings, [event("created", "sbx-v1"), b"{not json"])
            await wait_for(lambda: state_of(store, "sbx-v1"), what="the valid neighbour committed")
            # a later batch: its acks must not cover the invalid message still waiting for its dead letter
            await publish(channel, settings, [event("created", "sbx-v2")])
            await wait_for(lambda: state_of(store, "sbx-v2"), what="the later batch committed")
        # the dead-letter queue takes messages again: the held invalid message gets there
        await wait_for(
            lambda: queue_ready(channel, names.events_dlq), timeout=30, what="the held dead letter"
        )
    dead = await take_all(channel, names.events_dlq)
    assert [(m.body, (m.headers or {})[REASON_HEADER]) for m in dead] == [(b"{not json", "invalid_json")]
    assert await queue_ready(channel, names.events_queue) == 0


async def test_commands_the_broker_refuses_release_their_claims_at_once(
    pause_settings: Settings, store: Store, channel: aio_pika.abc.AbstractChannel, emulator: Emulator
) -> None:
    idle = ids("refused", 5)
    await seed(pause_settings, emulator, idle=idle)
    due_before = {sid: (await row(store, sid))["pause_due_at"] for sid in idle}
    names = Names(pause_settings.topology_prefix)
    async with ingest_running(pause_settings), refusing_queue(names.pause_queue):
        await tick(pause_settings)
    assert set((await states(store)).values()) == {"RUNNING"}
    for sid in idle:
        assert (await row(store, sid))["pause_due_at"] == due_before[sid]
        assert [(f, t, r) for f, t, r, _ in await transitions(store, sid)][-2:] == [
            ("RUNNING", "PAUSING", "idle"),
            ("PAUSING", "RUNNING", "publish_failed"),
        ]

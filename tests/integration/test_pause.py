"""Scheduler and worker on real RabbitMQ and Postgres, E2B through the real SDK and the emulator."""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import aio_pika

from consumer.broker import PAUSE_ROUTING_KEY, Names, message
from consumer.settings import PauseMode, Settings
from consumer.store import Store
from e2b_emulator import Emulator, Faults
from schemas import Outcome, PauseCommand

from ..helpers.amqp import publish
from ..helpers.database import row, state_of, states
from ..helpers.events import event, ids
from ..helpers.pipeline import ingest, seed, tick_with_ingest, work
from ..helpers.processes import Spawn, autopause, e2b_env, isolated_env
from ..helpers.waiting import wait_for


async def test_idle_sandboxes_are_paused_and_active_ones_never(
    pause_settings: Settings, store: Store, channel: aio_pika.abc.AbstractChannel, emulator: Emulator
) -> None:
    idle, active = ids("idle", 40), ids("busy", 40)
    await seed(pause_settings, emulator, idle=idle, active=active)
    lifecycle = await channel.declare_queue(exclusive=True)
    await lifecycle.bind(Names(pause_settings.topology_prefix).lifecycle_exchange, routing_key="sandbox.#")
    await tick_with_ingest(pause_settings)
    await work(pause_settings)
    rows = await states(store)
    assert {rows[s] for s in idle} == {"PAUSED"}
    assert {rows[s] for s in active} == {"RUNNING"}
    assert {emulator.state_of(s) for s in idle} == {"paused"}
    assert {emulator.state_of(s) for s in active} == {"running"}
    assert not [c for c in emulator.calls("pause") if c.sandbox_id in active]
    history = [(r.to_state, r.actor) for r in await store.transitions_of(idle[0])]
    assert history == [("RUNNING", "ingest"), ("PAUSING", "scheduler"), ("PAUSED", "worker")]
    announced = []
    while (msg := await lifecycle.get(fail=False, no_ack=True)) is not None:
        announced.append(Outcome.model_validate_json(msg.body))
    assert sorted(o.sandbox_id for o in announced) == sorted(idle)
    assert {(o.type, o.generation, o.dry_run) for o in announced} == {("sandbox.paused", 1, False)}


async def test_activity_between_claim_and_execution_cancels_the_pause(
    pause_settings: Settings, store: Store, channel: aio_pika.abc.AbstractChannel, emulator: Emulator
) -> None:
    await seed(pause_settings, emulator, idle=["late-1"])
    await tick_with_ingest(pause_settings)
    assert await state_of(store, "late-1") == "PAUSING"
    await publish(channel, pause_settings, [event("activity", "late-1")])
    await ingest(pause_settings)
    assert await state_of(store, "late-1") == "RUNNING"
    await work(pause_settings)
    assert emulator.calls("pause") == []
    assert await state_of(store, "late-1") == "RUNNING"


async def test_forged_or_stale_commands_never_reach_e2b(
    pause_settings: Settings, store: Store, channel: aio_pika.abc.AbstractChannel, emulator: Emulator
) -> None:
    await seed(pause_settings, emulator, active=["inuse-1"])
    exchange = await channel.get_exchange(Names(pause_settings.topology_prefix).commands_exchange)
    for generation in (1, 7):  # the row is RUNNING at generation 0: neither is backed
        command = PauseCommand(
            command_id=uuid.uuid4(),
            sandbox_id="inuse-1",
            generation=generation,
            issued_at=datetime.now(UTC),
        )
        await exchange.publish(message(command.model_dump_json().encode()), routing_key=PAUSE_ROUTING_KEY)
    await exchange.publish(
        message(b'{"type": "sandbox.pause", "sandbox_id": "inuse-1"}'),
        routing_key=PAUSE_ROUTING_KEY,
    )
    await work(pause_settings)
    assert [c.op for c in emulator.calls()] == ["list"]  # the key check at start; no sandbox call
    assert await state_of(store, "inuse-1") == "RUNNING"


async def test_gone_becomes_killed_and_already_paused_becomes_paused(
    pause_settings: Settings, store: Store, emulator: Emulator, caplog: Any
) -> None:
    await seed(pause_settings, emulator, idle=["gone-1", "paused-1"])
    emulator.faults.missing.add("gone-1")
    emulator.add_sandbox("paused-1", state="paused")
    await tick_with_ingest(pause_settings)
    await work(pause_settings)
    rows = await states(store)
    assert rows == {"gone-1": "KILLED", "paused-1": "PAUSED"}
    # E2B's answer to get_info settles both: no pause call is needed
    assert emulator.calls("pause") == []
    assert Counter(c.status for c in emulator.calls("info")) == Counter({404: 1, 200: 1})
    # outcomes with nobody listening on sandbox.lifecycle are not errors
    # (the seeded events are stamped an hour back, which ingest rightly warns about)
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and getattr(r, "action", "") != "ingest.producer_clock"
    ]
    assert warnings == []


async def test_a_storm_of_429_and_5xx_ends_paused_within_the_rate(
    pause_settings: Settings, store: Store, emulator: Emulator
) -> None:
    idle = ids("storm", 120)
    await seed(pause_settings, emulator, idle=idle)
    rate = 40.0
    stormy = pause_settings.model_copy(
        update={"e2b_rate_limit": rate, "worker_concurrency": 32, "pause_max_attempts": 30}
    )
    emulator.faults = Faults(error_rate=0.3, rate_limit=rate * 0.8)
    await tick_with_ingest(stormy)
    await work(stormy)
    assert {s for s, st in (await states(store)).items() if st != "PAUSED"} == set()
    statuses = Counter(c.status for c in emulator.calls("pause"))
    assert statuses[429] > 0 and statuses[500] + statuses[502] + statuses[503] > 0
    # the token bucket holds a tenth of a second of burst on top of the rate
    assert emulator.peak_rate("pause") <= rate + rate / 10 + 1


async def test_retries_spent_return_the_row_to_running_with_a_retry_after(
    pause_settings: Settings, store: Store, emulator: Emulator
) -> None:
    await seed(pause_settings, emulator, idle=["flaky-1"])
    emulator.faults.error_rate = 1.0
    failing = pause_settings.model_copy(update={"pause_max_attempts": 3})
    await tick_with_ingest(failing)
    await work(failing)
    failed = await row(store, "flaky-1")
    assert failed["state"] == "RUNNING"
    assert failed["last_error"] and failed["retry_after"] > datetime.now(UTC)
    # every attempt asks E2B first; each answer is a failure, so no pause call follows
    assert len(emulator.calls("info")) == 3 and emulator.calls("pause") == []
    emulator.faults.error_rate = 0.0
    await tick_with_ingest(failing)  # the retry-after is honoured: nothing is claimed again yet
    assert await state_of(store, "flaky-1") == "RUNNING"


async def test_dry_run_calls_nothing_and_records_the_would_be_pauses(
    pause_settings: Settings, store: Store, emulator: Emulator
) -> None:
    idle = ids("dry", 5)
    await seed(pause_settings, emulator, idle=idle, active=["busy-dry"])
    dry = pause_settings.model_copy(update={"dry_run": True})
    await tick_with_ingest(dry)
    await work(dry)
    assert emulator.calls() == []
    rows = await states(store)
    assert {rows[s] for s in idle} == {"RUNNING"}
    reasons = [r.reason for r in await store.transitions_of(idle[0])]
    assert reasons[-1] == "dry_run"
    assert [r.reason for r in await store.transitions_of("busy-dry")] == ["created"]
    await tick_with_ingest(dry)  # parked until new activity: not claimed again
    assert len(await store.transitions_of(idle[0])) == len(reasons)


async def test_kill_switch_stops_claiming_while_ingest_goes_on(
    pause_settings: Settings, store: Store, emulator: Emulator
) -> None:
    await seed(pause_settings, emulator, idle=["ks-1"])
    await tick_with_ingest(pause_settings.model_copy(update={"auto_pause_enabled": False}))
    assert await state_of(store, "ks-1") == "RUNNING"
    tick_row = await store.last_tick()
    assert tick_row is not None and tick_row.skipped == "disabled"


async def test_storm_breaker_claims_a_share_of_the_fleet_per_tick(
    pause_settings: Settings, store: Store, emulator: Emulator
) -> None:
    await seed(pause_settings, emulator, idle=ids("sb", 50))
    capped = pause_settings.model_copy(update={"claim_max_share": 0.2, "claim_min_per_tick": 1})
    await tick_with_ingest(capped)
    assert Counter((await states(store)).values()) == Counter({"PAUSING": 10, "RUNNING": 40})


async def test_an_expired_lease_is_republished_with_the_same_generation(
    pause_settings: Settings, store: Store, channel: aio_pika.abc.AbstractChannel, emulator: Emulator
) -> None:
    await seed(pause_settings, emulator, idle=["lease-1"])
    await tick_with_ingest(pause_settings)
    pause_queue = await channel.get_queue(Names(pause_settings.topology_prefix).pause_queue)
    await pause_queue.purge()  # the command is lost
    async with store.pool.acquire() as conn:
        await conn.execute("UPDATE sandbox_sessions SET claimed_at = now() - interval '1 hour'")
    await tick_with_ingest(pause_settings)
    await work(pause_settings)
    leased = await row(store, "lease-1")
    assert (leased["state"], leased["generation"]) == ("PAUSED", 1)


async def test_retention_expires_old_paused_sessions(
    pause_settings: Settings, store: Store, emulator: Emulator
) -> None:
    await seed(pause_settings, emulator, idle=["old-1", "new-1"])
    await tick_with_ingest(pause_settings)
    await work(pause_settings)
    async with store.pool.acquire() as conn:
        await conn.execute(
            "UPDATE sandbox_sessions SET paused_at = now() - interval '31 days' WHERE sandbox_id = 'old-1'"
        )
    await tick_with_ingest(pause_settings)
    assert await states(store) == {"old-1": "EXPIRED", "new-1": "PAUSED"}


async def test_three_schedulers_and_two_workers_make_one_pause_call_per_idle_sandbox(
    pause_settings: Settings, store: Store, emulator: Emulator, spawn: Spawn
) -> None:
    idle = ids("multi", 150)
    await seed(pause_settings, emulator, idle=idle, active=ids("alive", 20))
    emulator.faults.latency = 0.05
    env = isolated_env(
        pause_settings,
        **e2b_env(emulator.url),
        AUTOPAUSE_TICK_CRON="* * * * * *",
        AUTOPAUSE_CLAIM_BATCH_SIZE="20",
        AUTOPAUSE_CLAIM_MAX_SHARE="0.2",
    )
    spawn(autopause("run", "ingest"), env)
    for _ in range(3):
        spawn(autopause("run", "scheduler"), env)
    for _ in range(2):
        spawn(autopause("run", "worker"), env)

    async def all_paused() -> bool:
        rows = await states(store)
        return all(rows[s] == "PAUSED" for s in idle)

    await wait_for(all_paused, timeout=90, what="every idle sandbox paused")
    per_sandbox = Counter(c.sandbox_id for c in emulator.calls("pause"))
    assert set(per_sandbox) == set(idle)
    assert set(per_sandbox.values()) == {1}


async def test_filesystem_pause_mode_reaches_e2b(
    pause_settings: Settings, store: Store, emulator: Emulator
) -> None:
    await seed(pause_settings, emulator, idle=["fs-1"])
    filesystem = pause_settings.model_copy(update={"pause_mode": PauseMode.FILESYSTEM})
    await tick_with_ingest(filesystem)
    await work(filesystem)
    paused = emulator.sandbox("fs-1")
    assert paused is not None and (paused.state, paused.pause_mode) == ("paused", "filesystem")

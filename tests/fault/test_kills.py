"""Processes killed or stopped in the middle of their work: nothing is lost, nothing is done twice."""

from __future__ import annotations

import aio_pika

from consumer.broker import Names
from consumer.settings import Settings
from consumer.store import Store
from e2b_emulator import Emulator

from ..helpers.amqp import publish, queue_ready
from ..helpers.database import count_rows, row, rows_of, state_of
from ..helpers.events import expected_rows, traffic
from ..helpers.pipeline import seed, tick_with_ingest, work
from ..helpers.processes import Spawn, autopause, e2b_env, isolated_env, run
from ..helpers.waiting import wait_for


async def test_sigkill_in_the_middle_of_a_batch_loses_nothing(
    settings: Settings, store: Store, channel: aio_pika.abc.AbstractChannel, spawn: Spawn
) -> None:
    events = traffic(5000, seed=11)
    await publish(channel, settings, list(events))
    env = isolated_env(settings, AUTOPAUSE_BATCH_SIZE="200", AUTOPAUSE_FLUSH_INTERVAL="0.05")
    proc = spawn(autopause("run", "ingest"), env)
    await wait_for(lambda: count_rows(store), timeout=60, what="the first committed batch")
    proc.kill()
    assert len(await rows_of(store)) < len(expected_rows(events)), "killed too late to test anything"

    again = spawn(autopause("run", "ingest", "--burst"), env)
    assert await again.wait(120) == 0, again.output()
    assert await rows_of(store) == expected_rows(events)
    assert await queue_ready(channel, Names(settings.topology_prefix).events_queue) == 0


async def test_sigterm_exits_zero_and_loses_nothing(
    settings: Settings, store: Store, channel: aio_pika.abc.AbstractChannel, spawn: Spawn
) -> None:
    events = traffic(5000, seed=12)
    await publish(channel, settings, list(events))
    env = isolated_env(settings, AUTOPAUSE_BATCH_SIZE="200")
    proc = spawn(autopause("run", "ingest"), env)
    await wait_for(lambda: count_rows(store), timeout=60, what="the first committed batch")
    assert await proc.stop(30) == 0, proc.output()
    assert "ingest.stop" in proc.output()

    names = Names(settings.topology_prefix)
    assert await queue_ready(channel, names.events_dlq) == 0
    # what the stopped process did not take is still queued; a second run finishes it
    again = await run(autopause("run", "ingest", "--burst"), env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert await rows_of(store) == expected_rows(events)


async def test_a_worker_killed_mid_pause_is_redelivered_and_completes(
    pause_settings: Settings, store: Store, emulator: Emulator, spawn: Spawn
) -> None:
    await seed(pause_settings, emulator, idle=["crash-1"])
    await tick_with_ingest(pause_settings)
    emulator.faults.op_latency = {"pause": 3600.0}  # the pause call hangs: the worker is inside it
    # a short request timeout keeps the dead worker's hold on the row short (Settings.attempt_hold)
    env = isolated_env(
        pause_settings,
        **e2b_env(emulator.url),
        AUTOPAUSE_E2B_REQUEST_TIMEOUT="3",
    )
    proc = spawn(autopause("run", "worker"), env, "worker")

    async def calling() -> bool:
        return bool(emulator.calls("info")) and (await row(store, "crash-1"))["attempt_id"] is not None

    await wait_for(calling, timeout=30, what="the worker inside its E2B call")
    proc.kill()
    emulator.faults.op_latency = {}
    # the command comes back; the dead worker's hold on the row runs out, then it is paused once
    await work(pause_settings)
    assert await state_of(store, "crash-1") == "PAUSED"
    assert emulator.state_of("crash-1") == "paused"
    # the dead worker's call never got an answer (0); the second is the only one that paused
    assert sorted(c.status for c in emulator.calls("pause")) == [0, 204]

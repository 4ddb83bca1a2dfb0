"""Ground truth from E2B: reconcile with E2B's own list, and no pause of a sandbox whose CPU works.

Real RabbitMQ and Postgres; E2B through the real SDK and the emulator, whose
control side plays the world outside: sandboxes no app announced, E2B's own
pauses and resumes, CPU load.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime

import aio_pika
import pytest

from consumer.reconcile import Outcome, reconcile_once
from consumer.settings import Settings
from consumer.store import Prices, Store
from e2b_emulator import Emulator

from ..helpers.amqp import publish
from ..helpers.database import database, reasons, row, state_of, states, transitions
from ..helpers.events import event
from ..helpers.metrics import metric
from ..helpers.pipeline import ingest, seed, service, tick_with_ingest, work
from ..helpers.waiting import wait_for, wait_until_equal


async def reconcile(settings: Settings) -> Outcome:
    outcome = await reconcile_once(settings, dry_run=False)
    assert outcome.error is None, outcome.error
    return outcome


async def due(store: Store, sandbox_id: str) -> bool:
    async with store.pool.acquire() as conn:
        return bool(
            await conn.fetchval(
                "SELECT pause_due_at < now() - interval '1 second' FROM sandbox_sessions"
                " WHERE sandbox_id = $1",
                sandbox_id,
            )
        )


async def test_an_unannounced_sandbox_in_scope_is_adopted_and_paused_and_one_out_of_scope_left_alone(
    pause_settings: Settings, store: Store, emulator: Emulator
) -> None:
    settings = pause_settings.model_copy(
        update={"reconcile_metadata": "app=builder", "default_idle_timeout": 2.0}
    )
    emulator.add_sandbox("stray-in", metadata={"app": "builder", "team": "a"}, cpu_count=4, memory_mb=2048)
    emulator.add_sandbox("stray-out", metadata={"app": "other"})
    adopted_before = metric("autopause_reconcile_changes_total", reason="adopted")
    outcome = await reconcile(settings)
    assert outcome.changes["adopted"] == 1
    assert await states(store) == {"stray-in": "RUNNING"}
    adopted = await row(store, "stray-in")
    assert (adopted["cpu_count"], adopted["memory_mb"]) == (4, 2048)
    assert (await reasons(store, "stray-in")) == ["adopted"]
    await wait_for(lambda: due(store, "stray-in"), what="the adopted sandbox's timeout")
    await tick_with_ingest(settings)
    await work(settings)
    assert emulator.state_of("stray-in") == "paused"
    assert (await row(store, "stray-in"))["state"] == "PAUSED"
    assert emulator.state_of("stray-out") == "running"
    assert not emulator.calls("pause", "stray-out")
    assert metric("autopause_reconcile_changes_total", reason="adopted") == adopted_before + 1


async def test_without_a_scope_nothing_is_adopted(
    pause_settings: Settings, store: Store, emulator: Emulator
) -> None:
    emulator.add_sandbox("stray-any", metadata={"app": "builder"})
    outcome = await reconcile(pause_settings)
    assert outcome.changes["adopted"] == 0 and await states(store) == {}


async def test_a_sandbox_resumed_outside_is_noticed_in_one_reconcile_then_paused_again_when_idle(
    pause_settings: Settings, store: Store, emulator: Emulator
) -> None:
    settings = pause_settings.model_copy(update={"default_idle_timeout": 2.0})
    await seed(settings, emulator, idle=["woken-1"])
    await tick_with_ingest(settings)
    await work(settings)
    assert (await row(store, "woken-1"))["state"] == "PAUSED"
    emulator.resume_outside("woken-1")  # E2B's auto-resume, or an app's connect() without an event
    await reconcile(settings)
    assert (await row(store, "woken-1"))["state"] == "RUNNING"
    assert (await reasons(store, "woken-1"))[-1] == "resumed_outside"
    assert not await due(store, "woken-1")  # its deadline counts from now
    await wait_for(lambda: due(store, "woken-1"), what="the idle timeout again")
    await tick_with_ingest(settings)
    await work(settings)
    assert emulator.state_of("woken-1") == "paused"
    assert [c.status for c in emulator.calls("pause", "woken-1")] == [204, 204]


async def test_a_sandbox_paused_outside_is_never_sent_a_pause(
    pause_settings: Settings, store: Store, channel: aio_pika.abc.AbstractChannel, emulator: Emulator
) -> None:
    await seed(pause_settings, emulator, idle=["slept-1"])
    emulator.pause_outside("slept-1")  # E2B's on_timeout pause
    await reconcile(pause_settings)
    assert (await row(store, "slept-1"))["state"] == "PAUSED"
    assert (await reasons(store, "slept-1"))[-1] == "paused_outside"
    await tick_with_ingest(pause_settings)
    await work(pause_settings)
    assert emulator.calls("pause") == [] and emulator.calls("info") == []
    # used again, with no connect() from the app: the row follows, and a worker resumes it
    await publish(channel, pause_settings, [event("activity", "slept-1")])
    await ingest(pause_settings)
    await work(pause_settings)
    assert emulator.state_of("slept-1") == "running"
    assert emulator.calls("pause") == []
    # not a pause of ours: resumed for use, not counted as a pause that hit a sandbox in use
    assert (await reasons(store, "slept-1"))[-1] == "resumed_for_use"


async def test_a_vanished_sandbox_goes_killed_only_after_get_info_says_404(
    pause_settings: Settings, store: Store, emulator: Emulator
) -> None:
    await seed(pause_settings, emulator, idle=["vanish-1", "stays-1"])
    emulator.kill_outside("vanish-1")
    emulator.faults.update({"op_error_rate": {"info": 1.0}})  # E2B cannot confirm yet
    outcome = await reconcile(pause_settings)
    assert outcome.changes["gone"] == 0
    assert await states(store) == {"vanish-1": "RUNNING", "stays-1": "RUNNING"}
    emulator.faults.update({"op_error_rate": {}})
    outcome = await reconcile(pause_settings)
    assert outcome.changes["gone"] == 1
    assert await states(store) == {"vanish-1": "KILLED", "stays-1": "RUNNING"}
    assert (await reasons(store, "vanish-1"))[-1] == "gone"
    # only the unlisted sandbox was asked about, once per run
    assert [c.sandbox_id for c in emulator.calls("info")] == ["vanish-1", "vanish-1"]


async def test_a_listing_that_fails_halfway_changes_nothing(
    pause_settings: Settings, store: Store, emulator: Emulator
) -> None:
    fleet = [f"many-{i:03d}" for i in range(250)]  # three pages
    await seed(pause_settings, emulator, idle=fleet)
    for sid in fleet[:20]:
        emulator.pause_outside(sid)
    for sid in fleet[20:40]:
        emulator.kill_outside(sid)
    before = await states(store)
    async with store.pool.acquire() as conn:
        logged = await conn.fetchval("SELECT count(*) FROM session_transitions")
    emulator.faults.list_fail_after = 1  # the second page fails
    outcome = await reconcile_once(pause_settings, dry_run=False)
    assert outcome.error is not None and "listing failed" in outcome.error
    assert outcome.changes == {}
    assert await states(store) == before
    async with store.pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM session_transitions") == logged
    assert emulator.calls("info") == []
    emulator.faults.list_fail_after = None
    outcome = await reconcile(pause_settings)
    assert (outcome.changes["paused_outside"], outcome.changes["gone"]) == (20, 20)


async def test_a_dry_run_reports_what_would_change_and_changes_nothing(
    pause_settings: Settings, store: Store, emulator: Emulator
) -> None:
    await seed(pause_settings, emulator, idle=["dry-1"])
    emulator.pause_outside("dry-1")
    outcome = await reconcile_once(pause_settings, dry_run=True)
    assert outcome.changes["paused_outside"] == 1
    assert (await row(store, "dry-1"))["state"] == "RUNNING"


async def test_a_cpu_busy_sandbox_with_no_events_is_never_paused_while_busy(
    ticking_settings: Settings, store: Store, channel: aio_pika.abc.AbstractChannel, emulator: Emulator
) -> None:
    settings = ticking_settings.model_copy(update={"busy_cpu_percent": 50})
    emulator.add_sandbox("agent-1", cpu_used_pct=95.0)  # an agent at work, no user in sight
    await publish(channel, settings, [event("created", "agent-1")])
    busy_before = metric("autopause_busy_cpu_total")
    async with service(settings, {"ingest", "scheduler", "worker"}):

        async def vetoed(n: int) -> bool:
            return (await reasons(store, "agent-1")).count("busy_cpu") >= n

        await wait_for(lambda: vetoed(2), timeout=30, what="two pauses vetoed by the CPU")
        assert emulator.calls("pause") == []
        assert emulator.state_of("agent-1") == "running"
        emulator.set_cpu("agent-1", 1.0)  # the agent is done
        async with store.pool.acquire() as conn:
            dropped = await conn.fetchval("SELECT now()")
        await wait_until_equal(
            lambda: state_of(store, "agent-1"), "PAUSED", timeout=30, what="the pause after it"
        )
    assert [c.status for c in emulator.calls("pause")] == [204]
    # the first claim once its timeout passed paused it: at most one veto was already under way
    async with store.pool.acquire() as conn:
        after = await conn.fetch(
            "SELECT reason FROM session_transitions WHERE sandbox_id = 'agent-1' AND at > $1 ORDER BY id",
            dropped,
        )
    assert [r["reason"] for r in after][-2:] == ["idle", "paused"]
    assert [r["reason"] for r in after].count("busy_cpu") <= 1
    assert metric("autopause_busy_cpu_total") >= busy_before + 2
    # one metrics request per batch of candidates, never more requests than candidates
    assert 0 < len(emulator.calls("metrics")) <= len(await transitions(store, "agent-1"))


async def test_a_stale_cpu_sample_never_blocks_a_pause(
    pause_settings: Settings, store: Store, emulator: Emulator
) -> None:
    await seed(pause_settings, emulator, idle=["quiet-1"])
    emulator.set_cpu("quiet-1", 95.0, sample_age=120.0)  # the last sample is two minutes old
    await tick_with_ingest(pause_settings)
    await work(pause_settings)
    assert emulator.state_of("quiet-1") == "paused"


async def test_the_rate_limit_holds_with_reconcile_and_pauses_together(
    pause_settings: Settings, store: Store, emulator: Emulator
) -> None:
    # demand beyond the rate: 40 pauses and three list pages a second at 10 calls a second
    rate = 10.0
    settings = pause_settings.model_copy(
        update={"e2b_rate_limit": rate, "reconcile_cron": "* * * * * *", "worker_concurrency": 32}
    )
    idle = [f"both-{i:03d}" for i in range(40)]
    await seed(settings, emulator, idle=idle)
    for i in range(260):  # three pages to list on every reconcile
        emulator.add_sandbox(f"listed-{i:03d}")
    await tick_with_ingest(settings)
    async with service(settings, {"worker"}):

        async def done() -> bool:
            return all(emulator.state_of(s) == "paused" for s in idle) and len(emulator.calls("list")) >= 6

        await wait_for(done, timeout=60, what="every pause made and reconcile listing meanwhile")
    # the listings and the pauses shared the one rate: some listing ran while pauses were under way
    pauses = [c.at for c in emulator.calls("pause")]
    assert any(min(pauses) < c.at < max(pauses) for c in emulator.calls("list")), (
        "no listing during the pauses"
    )
    # A token is granted at the rate; its request reaches E2B a little later, later still on a
    # loaded machine: a quarter of a second of that delay is allowed for. Over four seconds,
    # listings that bypassed the limiter would add some 12 calls to the 40 the rate allows.
    capacity, jitter = max(1.0, rate / 10), 0.25
    for window in (1.0, 4.0):
        assert emulator.peak_rate(None, window=window) <= rate * (window + jitter) + capacity + 1, window


async def test_savings_count_each_sandbox_by_its_size(settings: Settings, store: Store) -> None:
    """Paused seconds x (vCPUs x price per vCPU-second + GiB x price per GiB-second)."""
    async with store.pool.acquire() as conn:
        for sid, cpus, mib in (("big-1", 8, 8192), ("unknown-1", None, None)):
            await conn.execute(
                "INSERT INTO sandbox_sessions (sandbox_id, state, last_activity, last_arrived_at,"
                " pause_due_at, cpu_count, memory_mb) VALUES ($1, 'RUNNING', now(), now(), now(), $2, $3)",
                sid,
                cpus,
                mib,
            )
            # paused for exactly 100 s, then resumed
            await conn.execute(
                "INSERT INTO session_transitions (sandbox_id, from_state, to_state, reason, actor,"
                " generation, at) VALUES"
                " ($1, 'PAUSING', 'PAUSED', 'paused', 'worker', 1, now() - interval '200 seconds'),"
                " ($1, 'PAUSED', 'RUNNING', 'resumed', 'ingest', 1, now() - interval '100 seconds')",
                sid,
            )
    prices = Prices(
        per_vcpu_second=0.000014, per_gib_second=0.0000045, default_cpu_count=2, default_memory_mb=512
    )
    seconds, usd = await store.paused_usage(prices)
    assert seconds == pytest.approx(200)
    big = 100 * (8 * 0.000014 + 8 * 0.0000045)
    default = 100 * (2 * 0.000014 + 0.5 * 0.0000045)
    assert usd == pytest.approx(big + default)


@dataclass(frozen=True)
class Listed:
    """A sandbox as E2B's listing gives it, for ``record_sizes``."""

    sandbox_id: str
    cpu_count: int | None = 4
    memory_mb: int | None = 2048
    end_at: datetime | None = None
    metadata: tuple[tuple[str, str], ...] = ()


async def test_recording_sizes_cannot_deadlock_with_an_ingest_batch(
    settings: Settings, store: Store, channel: aio_pika.abc.AbstractChannel
) -> None:
    await publish(channel, settings, [event("created", "sbx-a"), event("created", "sbx-b")])
    await ingest(settings)
    async with database(settings) as batch:  # an ingest batch locks its rows in sandbox-id order
        async with batch.transaction():
            await batch.execute("SELECT 1 FROM sandbox_sessions WHERE sandbox_id = 'sbx-a' FOR UPDATE")
            # reconcile writes the listing, in the listing's order: sbx-b first
            sizes = asyncio.create_task(
                store.record_sizes([Listed("sbx-b"), Listed("sbx-a")], datetime.now(UTC))
            )
            me = batch.get_server_pid()

            async def waits_for_the_batch() -> bool:
                async with database(settings) as conn:
                    return bool(
                        await conn.fetchval(
                            "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))", me
                        )
                    )

            await wait_for(waits_for_the_batch, what="reconcile waiting for the batch's row")
            # the batch goes on to its next row; holding sbx-b there, reconcile would deadlock with it
            await batch.execute("SELECT 1 FROM sandbox_sessions WHERE sandbox_id = 'sbx-b' FOR UPDATE")
        await sizes
    for sandbox_id in ("sbx-a", "sbx-b"):
        recorded = await row(store, sandbox_id)
        assert (recorded["cpu_count"], recorded["memory_mb"]) == (4, 2048), sandbox_id

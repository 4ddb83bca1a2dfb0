"""The operator CLI, run as a subprocess against the real services."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import aio_pika
import asyncpg
import orjson
import pytest

from consumer.broker import Names
from consumer.settings import Settings
from consumer.store import Store
from e2b_emulator import Emulator

from ..helpers.amqp import publish
from ..helpers.config import AMQP_URL, DATABASE_URL
from ..helpers.database import transitions
from ..helpers.events import ago, event, now
from ..helpers.pipeline import ingest, ingest_running, tick_with_ingest
from ..helpers.processes import cli, cli_ok, e2b_env


@pytest.fixture
async def seeded(settings: Settings, store: Store, channel: Any) -> Settings:
    """Two projects' sandboxes, one of them idle for an hour, all ingested."""
    await publish(
        channel,
        settings,
        [
            event("created", "sbx-idle", at=ago(3600), project_id="proj-a"),
            event("created", "sbx-busy", at=ago(3600), project_id="proj-a"),
            event("activity", "sbx-busy"),
            event("created", "sbx-other", at=ago(60), project_id="proj-b"),
        ],
    )
    await ingest(settings)
    return settings


async def test_status_reports_sessions_queues_and_savings(seeded: Settings) -> None:
    report = orjson.loads(await cli_ok(seeded, "status", "--json"))
    assert report["sessions"]["RUNNING"] == 3
    names = Names(seeded.topology_prefix)
    assert set(report["queues"]) == {names.events_queue, names.pause_queue, names.events_dlq, names.pause_dlq}
    assert report["dead_letters"] == {"events": {}, "pause": {}} and report["savings_usd"] == 0
    text = await cli_ok(seeded, "status")
    assert "RUNNING 3" in text and "savings" in text


async def test_sessions_list_filters_and_show_has_the_history(seeded: Settings) -> None:
    listed = await cli_ok(seeded, "sessions", "list", "--project", "proj-a", "--json")
    assert {r["sandbox_id"] for r in orjson.loads(listed)} == {"sbx-idle", "sbx-busy"}
    idle = await cli_ok(seeded, "sessions", "list", "--idle", "30m", "--json")
    assert [r["sandbox_id"] for r in orjson.loads(idle)] == ["sbx-idle"]
    shown = await cli_ok(seeded, "sessions", "show", "sbx-idle")
    assert "proj-a" in shown and "created" in shown and "ingest" in shown


async def test_errors_are_one_line_and_a_nonzero_exit(seeded: Settings) -> None:
    missing = await cli(seeded, "sessions", "show", "sbx-nope")
    assert missing.returncode == 1
    assert missing.stderr.strip() == "autopause: no session for sandbox 'sbx-nope'"
    refused = {
        ("sessions", "list", "--state", "SLEEPING"): "'SLEEPING' is not one of",
        ("sessions", "list", "--idle", "a while"): "duration 'a while'",
        ("sessions", "keep-alive", "sbx-idle", "--for", "soon"): "duration 'soon'",
        ("dlq", "list", "--queue", "elsewhere"): "'elsewhere' is not one of 'events', 'pause'",
        ("sessions", "resume"): "Missing argument",
    }
    for args, complaint in refused.items():
        done = await cli(seeded, *args)
        assert done.returncode == 2, args
        assert len(done.stderr.splitlines()) == 1 and complaint in done.stderr, done.stderr
        assert done.stderr.startswith(f"autopause {' '.join(args[:2])}: "), done.stderr
    lower = await cli_ok(seeded, "sessions", "list", "--state", "running", "--idle", "30m", "--json")
    assert [r["sandbox_id"] for r in orjson.loads(lower)] == ["sbx-idle"]
    no_broker = await cli(seeded, "status", AUTOPAUSE_AMQP_URL="amqp://guest:guest@127.0.0.1:1/")
    assert no_broker.returncode == 1 and "RabbitMQ" in no_broker.stderr
    assert "Traceback" not in no_broker.stderr


async def test_manual_pause_goes_through_the_tick_and_the_command_path(
    seeded: Settings, store: Store, emulator: Emulator
) -> None:
    emulator.add_sandbox("sbx-busy")
    await cli_ok(seeded, "sessions", "pause", "sbx-busy")
    await tick_with_ingest(seeded)
    row = await store.get_session("sbx-busy")
    assert row is not None and row.state == "PAUSING"
    await cli_ok(seeded, "run", "worker", "--burst", **e2b_env(emulator.url))
    row = await store.get_session("sbx-busy")
    assert row is not None and row.state == "PAUSED"
    assert emulator.state_of("sbx-busy") == "paused"
    again = await cli(seeded, "sessions", "pause", "sbx-busy")
    assert again.returncode == 2 and "PAUSED" in again.stderr


async def test_keep_alive_keeps_a_sandbox_out_of_the_tick(seeded: Settings, store: Store) -> None:
    await cli_ok(seeded, "sessions", "keep-alive", "sbx-idle", "--for", "2h")
    async with ingest_running(seeded):  # the tick claims only while ingest keeps up
        async with store.pool.acquire() as conn:  # every deadline but the keep-alive passed a minute ago
            await conn.execute(
                "UPDATE sandbox_sessions"
                " SET pause_due_at = GREATEST(now() - interval '1 minute', keep_alive_until)"
            )
        await cli_ok(seeded, "run", "scheduler", "--once")
        async with store.pool.acquire() as conn:
            pausing = await conn.fetchval("SELECT count(*) FROM sandbox_sessions WHERE state = 'PAUSING'")
        assert pausing > 0, "the tick claimed nothing at all"
        kept_row = await store.get_session("sbx-idle")
        assert kept_row is not None and kept_row.state == "RUNNING"
        # without the keep-alive the same tick claims it
        async with store.pool.acquire() as conn:
            await conn.execute(
                "UPDATE sandbox_sessions SET keep_alive_until = NULL,"
                " pause_due_at = now() - interval '1 minute' WHERE sandbox_id = 'sbx-idle'"
            )
        await cli_ok(seeded, "run", "scheduler", "--once")
    row = await store.get_session("sbx-idle")
    assert row is not None and row.state == "PAUSING"


async def test_a_dead_letter_replayed_after_a_fix_is_applied(
    settings: Settings, store: Store, channel: Any
) -> None:
    big = event("created", "sbx-meta", metadata={f"k{i}": "v" * 200 for i in range(10)})
    await publish(channel, settings, [big])
    strict = settings.model_copy(update={"max_message_bytes": 1024})
    await ingest(strict)
    assert await store.get_session("sbx-meta") is None

    letters = orjson.loads(await cli_ok(settings, "dlq", "list", "--json"))
    assert [(d["reason"], d["routing_key"]) for d in letters] == [("too_large", "sandbox.created")]
    assert "sbx-meta" in letters[0]["body"]
    listed_again = orjson.loads(await cli_ok(settings, "dlq", "list", "--json"))
    stable = ("reason", "routing_key", "detail", "body")
    assert [[d[k] for k in stable] for d in listed_again] == [[d[k] for k in stable] for d in letters], (
        "listing must not consume"
    )

    replayed = await cli_ok(settings, "dlq", "replay")  # the fix: the default size limit is back
    assert "replayed 1" in replayed
    await ingest(settings)
    row = await store.get_session("sbx-meta")
    assert row is not None and row.project_id == "proj-1"
    assert "empty" in await cli_ok(settings, "dlq", "list")


# read-only commands change nothing ------------------------------------------------------------


async def _schema_exists(settings: Settings) -> bool:
    conn = await asyncpg.connect(DATABASE_URL)
    try:
        return bool(
            await conn.fetchval("SELECT 1 FROM pg_namespace WHERE nspname = $1", settings.database_schema)
        )
    finally:
        await conn.close()


async def _queue_exists(name: str) -> bool:
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        try:
            await channel.declare_queue(name, passive=True)
        except aio_pika.exceptions.ChannelClosed:
            return False
        return True


async def test_read_only_commands_on_a_database_never_migrated_say_so_and_make_nothing(
    settings: Settings,
) -> None:
    names = Names(settings.topology_prefix)
    expected = (
        f"autopause: the schema {settings.database_schema} has no autopause tables; run `autopause migrate`"
    )
    for args in (("status",), ("sessions", "list"), ("sessions", "show", "sbx-any"), ("status", "--json")):
        done = await cli(settings, *args, AUTOPAUSE_DECLARE_TOPOLOGY="true")
        assert (done.returncode, done.stderr.strip()) == (1, expected), args
    listed = await cli(settings, "dlq", "list", AUTOPAUSE_DECLARE_TOPOLOGY="true")
    assert listed.returncode == 1 and len(listed.stderr.splitlines()) == 1
    assert f"RabbitMQ has no queue {names.events_dlq}" in listed.stderr
    assert not await _schema_exists(settings), "a read-only command migrated the database"
    assert not any([await _queue_exists(queue) for queue in names.queues()]), "it declared the topology"


async def test_status_reports_missing_queues_without_declaring_them(settings: Settings, store: Store) -> None:
    names = Names(settings.topology_prefix)
    report = orjson.loads(await cli_ok(settings, "status", "--json", AUTOPAUSE_DECLARE_TOPOLOGY="true"))
    assert report["queues"] == dict.fromkeys(
        [names.events_queue, names.pause_queue, names.events_dlq, names.pause_dlq]
    )
    assert report["dead_letters"] == {"events": None, "pause": None}
    text = await cli_ok(settings, "status")
    assert re.search(rf"^{re.escape(names.events_queue)} +missing +-$", text, re.MULTILINE)
    assert not any([await _queue_exists(queue) for queue in names.queues()])


async def test_commands_refuse_a_schema_that_lacks_a_migration(settings: Settings, store: Store) -> None:
    async with store.pool.acquire() as conn:
        await conn.execute("DELETE FROM autopause_migrations WHERE version = 2")
    done = await cli(settings, "sessions", "list")
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f"autopause: the schema {settings.database_schema} lacks migration 2; run `autopause migrate`"
    )


# sessions resume ------------------------------------------------------------------------------


async def _pause_through_the_pipeline(seeded: Settings, emulator: Emulator, sandbox: str) -> None:
    emulator.add_sandbox(sandbox)
    await cli_ok(seeded, "sessions", "pause", sandbox)
    await tick_with_ingest(seeded)
    await cli_ok(seeded, "run", "worker", "--burst", **e2b_env(emulator.url))
    assert emulator.state_of(sandbox) == "paused"


async def test_resume_runs_a_paused_sandbox_and_records_it(
    seeded: Settings, store: Store, emulator: Emulator
) -> None:
    await _pause_through_the_pipeline(seeded, emulator, "sbx-busy")
    e2b = e2b_env(emulator.url)
    no_key = await cli(seeded, "sessions", "resume", "sbx-busy", AUTOPAUSE_E2B_API_URL=emulator.url)
    assert no_key.returncode == 2 and "AUTOPAUSE_E2B_API_KEY" in no_key.stderr
    wrong_key = await cli(
        seeded, "sessions", "resume", "sbx-busy", **(e2b | {"AUTOPAUSE_E2B_API_KEY": "e2b_wrong"})
    )
    assert wrong_key.returncode == 1 and "AUTOPAUSE_E2B_API_KEY" in wrong_key.stderr
    assert "e2b_wrong" not in wrong_key.stderr
    assert len(wrong_key.stderr.splitlines()) == 1
    assert emulator.state_of("sbx-busy") == "paused"
    paused_row = await store.get_session("sbx-busy")
    assert paused_row is not None and paused_row.state == "PAUSED"

    before = now()
    resumed = await cli_ok(seeded, "sessions", "resume", "sbx-busy", "--resume-timeout", "900", **e2b)
    assert "resumed" in resumed and "RUNNING" in resumed
    assert emulator.state_of("sbx-busy") == "running"
    box = emulator.sandbox("sbx-busy")
    assert box is not None and before + timedelta(seconds=890) < box.end_at < now() + timedelta(seconds=910)
    row = await store.get_session("sbx-busy")
    assert row is not None and row.state == "RUNNING" and row.resume_requested_at is None
    # a fresh idle deadline, from the resume: the seeded default timeout is 600 s
    assert before + timedelta(seconds=590) < row.pause_due_at < now() + timedelta(seconds=610)
    assert (await transitions(store, "sbx-busy"))[-1] == ("PAUSED", "RUNNING", "resumed_by_operator", "cli")

    again = await cli(seeded, "sessions", "resume", "sbx-busy", **e2b)
    assert again.returncode == 2
    assert (
        again.stderr.strip() == "autopause: sandbox sbx-busy is RUNNING: only a PAUSED sandbox can be resumed"
    )
    assert len(emulator.calls("connect", "sbx-busy")) == 2  # the refused key and the resume: no third


async def test_resume_of_a_sandbox_e2b_no_longer_has_marks_it_gone(
    seeded: Settings, store: Store, emulator: Emulator
) -> None:
    async with store.pool.acquire() as conn:  # paused once; E2B has since forgotten it
        await conn.execute(
            "UPDATE sandbox_sessions SET state = 'PAUSED', paused_at = now() WHERE sandbox_id = 'sbx-idle'"
        )
    done = await cli(seeded, "sessions", "resume", "sbx-idle", **e2b_env(emulator.url))
    assert done.returncode == 1
    assert (
        done.stderr.strip()
        == "autopause: E2B has no sandbox sbx-idle any more; its session is now KILLED (gone)"
    )
    row = await store.get_session("sbx-idle")
    assert row is not None and row.state == "KILLED" and row.killed_at is not None
    assert (await transitions(store, "sbx-idle"))[-1] == ("PAUSED", "KILLED", "gone", "cli")
    assert [c.status for c in emulator.calls("connect", "sbx-idle")] == [404]


async def test_sessions_show_escapes_what_a_producer_wrote(
    settings: Settings, store: Store, channel: Any
) -> None:
    note = "\x1b[2J\x1b[Hall clear\n\u009b31m\u202e"
    await publish(channel, settings, [event("created", "sbx-note", metadata={"note": note})])
    await ingest(settings)
    for args in (
        ("sessions", "show", "sbx-note"),
        ("sessions", "list"),
        ("sessions", "show", "sbx-note", "--json"),
    ):
        out = await cli_ok(settings, *args)
        assert all(char.isprintable() or char == "\n" for char in out), args
    shown = await cli_ok(settings, "sessions", "show", "sbx-note")
    # JSON escapes the C0 controls itself; the view escapes the rest
    assert '{"note":"\\u001b[2J\\u001b[Hall clear\\n\\x9b31m\\u202e"}' in shown
    as_json = orjson.loads(await cli_ok(settings, "sessions", "show", "sbx-note", "--json"))
    assert as_json["session"]["metadata"] == {"note": note}  # escaped in spelling only

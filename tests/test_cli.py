"""The operator CLI, run as a subprocess against the real services."""

from __future__ import annotations

import re
import subprocess
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import aio_pika
import asyncpg
import orjson
import pytest
from conftest import (
    AMQP_URL,
    DATABASE_URL,
    ago,
    autopause,
    cli,
    event,
    ingest_caught_up,
    now,
    publish,
    service,
    tick_with_ingest,
    transitions,
    wait_for,
)

from consumer import runner
from consumer.broker import Names
from consumer.settings import Settings
from consumer.store import Store
from e2b_emulator import Emulator

KEY = "e2b_cli_test_key"


@pytest.fixture
async def emulator() -> AsyncIterator[Emulator]:
    async with Emulator(api_key=KEY) as emu:
        yield emu


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
    assert await runner.run(settings, {"ingest"}, burst=True) == 0
    return settings


async def test_status_reports_sessions_queues_and_savings(seeded: Settings) -> None:
    result = await cli(seeded, "status", "--json")
    assert result.returncode == 0, result.stderr
    report = orjson.loads(result.stdout)
    assert report["sessions"]["RUNNING"] == 3
    names = Names(seeded.topology_prefix)
    assert set(report["queues"]) == {names.events_queue, names.pause_queue, names.events_dlq, names.pause_dlq}
    assert report["dead_letters"] == {"events": {}, "pause": {}} and report["savings_usd"] == 0
    text = await cli(seeded, "status")
    assert "RUNNING 3" in text.stdout and "savings" in text.stdout


async def test_sessions_list_filters_and_show_has_the_history(seeded: Settings) -> None:
    listed = await cli(seeded, "sessions", "list", "--project", "proj-a", "--json")
    assert listed.returncode == 0, listed.stderr
    assert {r["sandbox_id"] for r in orjson.loads(listed.stdout)} == {"sbx-idle", "sbx-busy"}
    idle = await cli(seeded, "sessions", "list", "--idle", "30m", "--json")
    assert [r["sandbox_id"] for r in orjson.loads(idle.stdout)] == ["sbx-idle"]
    shown = await cli(seeded, "sessions", "show", "sbx-idle")
    assert shown.returncode == 0
    assert "proj-a" in shown.stdout and "created" in shown.stdout and "ingest" in shown.stdout


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
    lower = await cli(seeded, "sessions", "list", "--state", "running", "--idle", "30m", "--json")
    assert lower.returncode == 0, lower.stderr
    assert [r["sandbox_id"] for r in orjson.loads(lower.stdout)] == ["sbx-idle"]
    no_broker = await cli(seeded, "status", AUTOPAUSE_AMQP_URL="amqp://guest:guest@127.0.0.1:1/")
    assert no_broker.returncode == 1 and "RabbitMQ" in no_broker.stderr
    assert "Traceback" not in no_broker.stderr


async def test_manual_pause_goes_through_the_tick_and_the_command_path(
    seeded: Settings, store: Store, emulator: Emulator
) -> None:
    emulator.add_sandbox("sbx-busy")
    paused = await cli(seeded, "sessions", "pause", "sbx-busy")
    assert paused.returncode == 0, paused.stderr
    await tick_with_ingest(seeded)
    row = await store.get_session("sbx-busy")
    assert row is not None and row.state == "PAUSING"
    worker = await cli(
        seeded, "run", "worker", "--burst", AUTOPAUSE_E2B_API_URL=emulator.url, AUTOPAUSE_E2B_API_KEY=KEY
    )
    assert worker.returncode == 0, worker.stdout
    row = await store.get_session("sbx-busy")
    assert row is not None and row.state == "PAUSED"
    assert emulator.state_of("sbx-busy") == "paused"
    again = await cli(seeded, "sessions", "pause", "sbx-busy")
    assert again.returncode == 2 and "PAUSED" in again.stderr


async def test_keep_alive_keeps_a_sandbox_out_of_the_tick(seeded: Settings, store: Store) -> None:
    kept = await cli(seeded, "sessions", "keep-alive", "sbx-idle", "--for", "2h")
    assert kept.returncode == 0, kept.stderr
    async with service(seeded, {"ingest"}):  # the tick claims only while ingest keeps up
        await wait_for(lambda: ingest_caught_up(seeded), what="ingest caught up")
        async with store.pool.acquire() as conn:  # every deadline but the keep-alive passed a minute ago
            await conn.execute(
                "UPDATE sandbox_sessions"
                " SET pause_due_at = GREATEST(now() - interval '1 minute', keep_alive_until)"
            )
        tick = await cli(seeded, "run", "scheduler", "--once")
        assert tick.returncode == 0, tick.stdout
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
        tick = await cli(seeded, "run", "scheduler", "--once")
        assert tick.returncode == 0, tick.stdout
    row = await store.get_session("sbx-idle")
    assert row is not None and row.state == "PAUSING"


async def test_a_dead_letter_replayed_after_a_fix_is_applied(
    settings: Settings, store: Store, channel: Any
) -> None:
    big = event("created", "sbx-meta", metadata={f"k{i}": "v" * 200 for i in range(10)})
    await publish(channel, settings, [big])
    strict = settings.model_copy(update={"max_message_bytes": 1024})
    assert await runner.run(strict, {"ingest"}, burst=True) == 0
    assert await store.get_session("sbx-meta") is None

    listed = await cli(settings, "dlq", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    letters = orjson.loads(listed.stdout)
    assert [(d["reason"], d["routing_key"]) for d in letters] == [("too_large", "sandbox.created")]
    assert "sbx-meta" in letters[0]["body"]
    listed_again = await cli(settings, "dlq", "list", "--json")
    assert len(orjson.loads(listed_again.stdout)) == 1, "listing must not consume"

    replayed = await cli(settings, "dlq", "replay")  # the fix: the default size limit is back
    assert replayed.returncode == 0 and "replayed 1" in replayed.stdout
    assert await runner.run(settings, {"ingest"}, burst=True) == 0
    row = await store.get_session("sbx-meta")
    assert row is not None and row.project_id == "proj-1"
    empty = await cli(settings, "dlq", "list")
    assert "empty" in empty.stdout


def test_every_setting_flag_has_its_environment_twin_in_help() -> None:
    import typer
    from typer.core import TyperGroup, TyperOption

    from consumer.cli import app

    root = typer.main.get_command(app)
    assert isinstance(root, TyperGroup)
    commands: list[Any] = [root]
    for command in root.commands.values():
        commands += list(command.commands.values()) if isinstance(command, TyperGroup) else [command]
    # per-invocation selectors and switches, not settings: they have no environment twin
    selectors = {
        "help",
        "burst",
        "once",
        "as_json",
        "project",
        "user",
        "state",
        "idle",
        "limit",
        "duration",
        "queue",
        "report_only",
    }
    checked = 0
    for command in commands:
        for param in command.params:
            if not isinstance(param, TyperOption) or (param.name in selectors and param.envvar is None):
                continue
            checked += 1
            assert param.envvar and param.show_envvar, (
                f"{command.name} --{param.name} has no environment twin"
            )
            assert str(param.envvar).startswith("AUTOPAUSE_")
    assert checked >= 30
    run_help = subprocess.run(
        autopause("run", "--help"),
        capture_output=True,
        text=True,
        timeout=30,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )
    for name in (
        "AUTOPAUSE_DRY_RUN",
        "AUTOPAUSE_WORKER_CONCURRENCY",
        "AUTOPAUSE_TICK_CRON",
        "AUTOPAUSE_EMULATOR",
    ):
        assert name in run_help.stdout


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
    done = await cli(settings, "status", "--json", AUTOPAUSE_DECLARE_TOPOLOGY="true")
    assert done.returncode == 0, done.stderr
    report = orjson.loads(done.stdout)
    assert report["queues"] == dict.fromkeys(
        [names.events_queue, names.pause_queue, names.events_dlq, names.pause_dlq]
    )
    assert report["dead_letters"] == {"events": None, "pause": None}
    text = await cli(settings, "status")
    assert re.search(rf"^{re.escape(names.events_queue)} +missing +-$", text.stdout, re.MULTILINE)
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
    assert (await cli(seeded, "sessions", "pause", sandbox)).returncode == 0
    await tick_with_ingest(seeded)
    worker = await cli(
        seeded, "run", "worker", "--burst", AUTOPAUSE_E2B_API_URL=emulator.url, AUTOPAUSE_E2B_API_KEY=KEY
    )
    assert worker.returncode == 0, worker.stdout + worker.stderr
    assert emulator.state_of(sandbox) == "paused"


async def test_resume_runs_a_paused_sandbox_and_records_it(
    seeded: Settings, store: Store, emulator: Emulator
) -> None:
    await _pause_through_the_pipeline(seeded, emulator, "sbx-busy")
    e2b = {"AUTOPAUSE_E2B_API_URL": emulator.url, "AUTOPAUSE_E2B_API_KEY": KEY}
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
    resumed = await cli(seeded, "sessions", "resume", "sbx-busy", "--resume-timeout", "900", **e2b)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed" in resumed.stdout and "RUNNING" in resumed.stdout
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
    done = await cli(
        seeded,
        "sessions",
        "resume",
        "sbx-idle",
        AUTOPAUSE_E2B_API_URL=emulator.url,
        AUTOPAUSE_E2B_API_KEY=KEY,
    )
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
    assert await runner.run(settings, {"ingest"}, burst=True) == 0
    for args in (
        ("sessions", "show", "sbx-note"),
        ("sessions", "list"),
        ("sessions", "show", "sbx-note", "--json"),
    ):
        done = await cli(settings, *args)
        assert done.returncode == 0, done.stderr
        assert all(char.isprintable() or char == "\n" for char in done.stdout), args
    shown = await cli(settings, "sessions", "show", "sbx-note")
    # JSON escapes the C0 controls itself; the view escapes the rest
    assert '{"note":"\\u001b[2J\\u001b[Hall clear\\n\\x9b31m\\u202e"}' in shown.stdout
    as_json = orjson.loads((await cli(settings, "sessions", "show", "sbx-note", "--json")).stdout)
    assert as_json["session"]["metadata"] == {"note": note}  # escaped in spelling only

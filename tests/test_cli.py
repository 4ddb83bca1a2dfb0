"""The operator CLI, run as a subprocess against the real services."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from conftest import (
    ago,
    autopause,
    event,
    ingest_caught_up,
    isolated_env,
    publish,
    service,
    tick_with_ingest,
    wait_for,
)

from consumer import runner
from consumer.broker import Names
from consumer.settings import Settings
from consumer.store import Store
from e2b_emulator import Emulator

KEY = "e2b_cli_test_key"


async def cli(settings: Settings, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        autopause(*args),
        env=isolated_env(settings, **env),
        capture_output=True,
        text=True,
        timeout=60,
    )


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
    bad_state = await cli(seeded, "sessions", "list", "--state", "SLEEPING")
    assert bad_state.returncode == 2 and "Traceback" not in bad_state.stderr
    bad_duration = await cli(seeded, "sessions", "keep-alive", "sbx-idle", "--for", "soon")
    assert bad_duration.returncode == 2 and "duration" in bad_duration.stderr
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
    assert row is not None and row["state"] == "PAUSING"
    worker = await cli(
        seeded, "run", "worker", "--burst", AUTOPAUSE_E2B_API_URL=emulator.url, AUTOPAUSE_E2B_API_KEY=KEY
    )
    assert worker.returncode == 0, worker.stdout
    row = await store.get_session("sbx-busy")
    assert row is not None and row["state"] == "PAUSED"
    assert emulator.state_of("sbx-busy") == "paused"
    again = await cli(seeded, "sessions", "pause", "sbx-busy")
    assert again.returncode == 2 and "PAUSED" in again.stderr


async def test_keep_alive_keeps_a_sandbox_out_of_the_tick(seeded: Settings, store: Store) -> None:
    kept = await cli(seeded, "sessions", "keep-alive", "sbx-idle", "--for", "2h")
    assert kept.returncode == 0, kept.stderr
    async with service(seeded, {"ingest"}):  # the tick claims only while ingest keeps up
        await wait_for(lambda: ingest_caught_up(seeded), what="ingest caught up")
        async with store.pool.acquire() as conn:  # every deadline but the keep-alive has passed
            await conn.execute("UPDATE sandbox_sessions SET pause_due_at = GREATEST(now(), keep_alive_until)")
        tick = await cli(seeded, "run", "scheduler", "--once")
        assert tick.returncode == 0, tick.stdout
        assert (await store.get_session("sbx-idle"))["state"] == "RUNNING"  # type: ignore[index]
        # without the keep-alive the same tick claims it
        async with store.pool.acquire() as conn:
            await conn.execute(
                "UPDATE sandbox_sessions SET keep_alive_until = NULL, pause_due_at = now()"
                " WHERE sandbox_id = 'sbx-idle'"
            )
        await cli(seeded, "run", "scheduler", "--once")
    row = await store.get_session("sbx-idle")
    assert row is not None and row["state"] == "PAUSING"


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
    assert row is not None and row["project_id"] == "proj-1"
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

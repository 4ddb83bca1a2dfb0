"""The CLI and the settings before anything connects: flags and their environment twins, refusals at start."""

from __future__ import annotations

import socket
import subprocess
from typing import Any

import pytest
import typer
from typer.core import TyperGroup, TyperOption

from consumer.broker import connection_name
from consumer.cli import app
from consumer.errors import ConfigError
from consumer.settings import load_settings

from ..helpers.processes import autopause, clean_env, run_sync


def test_every_setting_flag_has_its_environment_twin_in_help() -> None:
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
    run_help = run_sync(autopause("run", "--help"), clean_env(COLUMNS="200"))
    assert run_help.returncode == 0, run_help.stderr
    for name in (
        "AUTOPAUSE_DRY_RUN",
        "AUTOPAUSE_WORKER_CONCURRENCY",
        "AUTOPAUSE_TICK_CRON",
        "AUTOPAUSE_EMULATOR",
    ):
        assert name in run_help.stdout


def test_invalid_settings_fail_at_start_naming_the_setting() -> None:
    env = clean_env(AUTOPAUSE_BATCH_SIZE="0")
    result = run_sync(autopause("run", "ingest"), env)
    assert result.returncode == 2
    assert "AUTOPAUSE_BATCH_SIZE" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_worker_without_a_key_or_the_emulator_refuses_to_start() -> None:
    done = subprocess.run(
        autopause("run", "worker"), env=clean_env(), capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2, done.stderr
    assert "no E2B API key" in done.stderr and "--emulator" in done.stderr
    assert "Traceback" not in done.stderr


def test_settings_that_cannot_fit_a_pause_in_its_lease_are_refused() -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings(e2b_request_timeout=60, pause_max_attempts=10, pause_lease=300)
    assert "AUTOPAUSE_PAUSE_LEASE" in str(refused.value)
    assert "AUTOPAUSE_E2B_REQUEST_TIMEOUT" in str(refused.value)
    assert load_settings().pause_lease >= 2 * load_settings().e2b_request_timeout


def test_connections_are_named_for_the_management_ui() -> None:
    name = connection_name("worker")
    assert name.startswith("autopause worker ")
    assert socket.gethostname() in name and "pid " in name

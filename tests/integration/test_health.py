"""Health and logs of a running process: the compose probe against a live server, no secret in a log."""

from __future__ import annotations

import json
import sys

import aio_pika
import pytest

from consumer.health import Health, serve
from consumer.settings import Settings
from consumer.store import Store
from e2b_emulator import Emulator, Faults

from ..helpers.amqp import publish
from ..helpers.compose import compose_file
from ..helpers.database import arrived_long_ago
from ..helpers.events import ago, event
from ..helpers.pipeline import ingest_running
from ..helpers.processes import autopause, clean_env, isolated_env, run


@pytest.mark.isolated
async def test_the_health_probe_fails_when_a_loop_stalls() -> None:
    probe = compose_file()["x-autopause-healthcheck"]["test"]
    assert probe[:2] == ["CMD", "python"]
    health = Health(stale_after=60)
    health.beat("loop")
    server = await serve(health, "127.0.0.1", 0)
    try:
        port = server.addresses[0][1]
        command = [sys.executable, *(arg.replace(":9464/", f":{port}/") for arg in probe[2:])]
        healthy = await run(command, clean_env(), timeout=60)
        assert healthy.returncode == 0, healthy.stderr
        health.beats["loop"] -= 120
        stalled = await run(command, clean_env(), timeout=60)
        assert stalled.returncode == 1 and "503" in stalled.stderr, stalled.stderr
    finally:
        await server.cleanup()


async def test_no_log_line_contains_the_e2b_key(
    settings: Settings, store: Store, channel: aio_pika.abc.AbstractChannel
) -> None:
    secret = "e2b_fake_5ecret_d0_not_log_me_123456"
    base = isolated_env(
        settings,
        AUTOPAUSE_E2B_API_KEY=secret,
        AUTOPAUSE_LOG_LEVEL="DEBUG",
        AUTOPAUSE_LOG_FORMAT="json",
        AUTOPAUSE_PAUSE_MAX_ATTEMPTS="2",
        AUTOPAUSE_RETRY_BASE_DELAY="0.01",
        AUTOPAUSE_RETRY_MAX_DELAY="0.02",
    )
    outputs = []

    async def autopause_run(*args: str, expect: int = 0, **env: str) -> None:
        done = await run(autopause(*args), base | env, timeout=60)
        assert done.returncode == expect, done.stderr
        outputs.append(done.stdout + done.stderr)

    await publish(channel, settings, [event("created", "sbx-key", at=ago(3600))])
    await autopause_run("run", "ingest", "--burst")
    await arrived_long_ago(settings)
    async with ingest_running(settings):  # the tick claims only while ingest keeps up
        await autopause_run("run", "scheduler", "--once")
    async with Emulator(api_key="e2b_another_key") as refusing:  # our key is refused at start
        await autopause_run("run", "worker", "--burst", expect=2, AUTOPAUSE_E2B_API_URL=refusing.url)
        assert [c.status for c in refusing.calls()] == [401]
    # the key is taken, every answer is an error: the errors of the pause get logged
    async with Emulator(api_key=secret, faults=Faults(error_rate=1.0)) as failing:
        failing.add_sandbox("sbx-key")
        await autopause_run("run", "worker", "--burst", AUTOPAUSE_E2B_API_URL=failing.url)
        calls = failing.calls("info")
    assert calls and {c.status for c in calls} <= {500, 502, 503}
    logs = "\n".join(outputs)
    assert "refused the API key" in logs and "e2b.unconfirmed" in logs
    assert "worker.finish" in logs and "pause_failed" in logs
    assert secret not in logs
    for line in filter(None, logs.splitlines()):
        if line.startswith("autopause: "):
            continue  # the command's own one-line error, as every command prints it
        assert line.startswith("{"), line  # every log line is one JSON record
        json.loads(line)

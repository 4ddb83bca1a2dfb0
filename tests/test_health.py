"""Metrics, health and logs of a running process."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
from typing import Any

import aiohttp
from conftest import (
    DATABASE_URL,
    ago,
    arrived_long_ago,
    autopause,
    event,
    ingest_caught_up,
    isolated_env,
    publish,
    service,
    wait_for,
)
from tcpproxy import Proxy

from consumer import runner
from consumer.broker import connection_name
from consumer.settings import Settings
from e2b_emulator import Emulator, Faults


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus text exposition (0 when absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        sample, _, label_text = key.partition("{")
        if sample != name:
            continue
        found = ",".join(sorted(label_text.rstrip("}").split(","))) if label_text else ""
        if found == wanted:
            return float(value)
    return 0.0


async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with session.get(url) as response:
        return response.status, await response.text()


async def test_metrics_move_and_readiness_follows_the_database(
    settings: Settings, store: Any, channel: Any
) -> None:
    proxy = Proxy("127.0.0.1", 5432)
    port = await proxy.start()
    metrics_port = free_port()
    watched = settings.model_copy(
        update={
            "database_url": type(settings.database_url)(DATABASE_URL.replace(":5432", f":{port}")),
            "metrics_port": metrics_port,
            "metrics_host": "127.0.0.1",
        }
    )
    stop = asyncio.Event()
    service = asyncio.create_task(runner.run(watched, {"ingest"}, stop=stop))
    base = f"http://127.0.0.1:{metrics_port}"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:

        async def status_of(path: str) -> int:
            try:
                return (await get(http, base + path))[0]
            except aiohttp.ClientError:
                return 0

        await wait_for(lambda: _is(status_of("/readyz"), 200), what="ready")
        assert await status_of("/healthz") == 200
        _, before = await get(http, base + "/metrics")
        start = metric(before, "autopause_events_ingested_total", type="sandbox.activity")
        rejected = metric(before, "autopause_events_rejected_total", reason="invalid_json")

        await publish(channel, settings, [event("activity", f"sbx-m{i}") for i in range(25)] + [b"{oops"])

        async def moved() -> bool:
            _, text = await get(http, base + "/metrics")
            return metric(text, "autopause_events_ingested_total", type="sandbox.activity") == start + 25

        await wait_for(moved, what="the ingested counter to move by 25")

        async def counted() -> bool:  # a dead letter counts once the broker confirmed it, after the commit
            _, text = await get(http, base + "/metrics")
            return metric(text, "autopause_events_rejected_total", reason="invalid_json") == rejected + 1

        await wait_for(counted, what="the rejected counter to move by 1")
        _, after = await get(http, base + "/metrics")
        assert metric(after, "autopause_ingest_batch_size_count") >= 1
        assert metric(after, "autopause_ingest_lag_seconds_count") >= 1  # one sample per committed batch

        await proxy.cut()
        await wait_for(lambda: _is(status_of("/readyz"), 503), what="unready without the database")
        _, body = await get(http, base + "/readyz")
        assert json.loads(body)["checks"]["database"] is False
        await proxy.restore()
        await wait_for(lambda: _is(status_of("/readyz"), 200), what="ready again")
    stop.set()
    assert await service == 0
    await proxy.cut()


async def _is(value: Any, expected: int) -> bool:
    return bool(await value == expected)


async def test_no_log_line_contains_the_e2b_key(settings: Settings, store: Any, channel: Any) -> None:
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

    async def run(*args: str, expect: int = 0, **env: str) -> None:
        done = await asyncio.to_thread(
            subprocess.run, autopause(*args), env=base | env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == expect, done.stderr
        outputs.append(done.stdout + done.stderr)

    await publish(channel, settings, [event("created", "sbx-key", at=ago(3600))])
    await run("run", "ingest", "--burst")
    await arrived_long_ago(settings)
    async with service(settings, {"ingest"}):  # the tick claims only while ingest keeps up
        await wait_for(lambda: ingest_caught_up(settings), what="ingest caught up")
        await run("run", "scheduler", "--once")
    async with Emulator(api_key="e2b_another_key") as refusing:  # our key is refused at start
        await run("run", "worker", "--burst", expect=2, AUTOPAUSE_E2B_API_URL=refusing.url)
        assert [c.status for c in refusing.calls()] == [401]
    # the key is taken, every answer is an error: the errors of the pause get logged
    async with Emulator(api_key=secret, faults=Faults(error_rate=1.0)) as failing:
        failing.add_sandbox("sbx-key")
        await run("run", "worker", "--burst", AUTOPAUSE_E2B_API_URL=failing.url)
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


def test_connections_are_named_for_the_management_ui() -> None:
    name = connection_name("worker")
    assert name.startswith("autopause worker ")
    assert socket.gethostname() in name and "pid " in name

"""The E2B emulator: spec answers over raw HTTP, the real SDK's calls, metrics, faults, control API."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from e2b import AsyncSandbox
from e2b.api.client.api.sandboxes import get_sandboxes_metrics
from e2b.api.client.models import Error, SandboxesWithMetrics, SandboxMetric, SandboxState
from e2b.api.client_async import get_api_client
from e2b.connection_config import ConnectionConfig
from e2b.exceptions import SandboxException, SandboxNotFoundException, ServiceBusyException
from e2b.sandbox.sandbox_api import SandboxQuery

from e2b_emulator import Call, Emulator, Faults, serve

from ..helpers.waiting import wait_for

pytestmark = pytest.mark.isolated  # the emulator only

KEY = "e2b_test_key"
MIB = 1024 * 1024
# A wall-clock start on the 5 s grid of Unix time, plus 2 s.
T0 = datetime(2026, 8, 20, 12, 0, 2, tzinfo=UTC)
T0_UNIX = int(T0.timestamp())


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeWall:
    """The emulator's wall clock, moved by the test."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now


@pytest.fixture
def wall() -> FakeWall:
    return FakeWall()


@pytest.fixture
async def emulator(wall: FakeWall) -> AsyncIterator[Emulator]:
    async with Emulator(seed=7, wall_clock=wall) as emu:
        yield emu


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


def sdk_opts(emu: Emulator) -> dict[str, Any]:
    return {"api_url": emu.url, "api_key": KEY, "request_timeout": 5, "retries": 0}


async def request(
    http: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    key: str | None = KEY,
    json: Any = None,
) -> tuple[int, Any]:
    headers = {"X-API-KEY": key} if key is not None else {}
    async with http.request(method, url, json=json, headers=headers) as resp:
        body = await resp.json() if resp.content_type == "application/json" else None
        return resp.status, body


async def list_ids(emu: Emulator, query: SandboxQuery | None, limit: int | None) -> list[str]:
    """Every page of the SDK's paginator."""
    paginator = AsyncSandbox.list(query=query, limit=limit, **sdk_opts(emu))
    ids: list[str] = []
    while paginator.has_next:
        ids += [info.sandbox_id for info in await paginator.next_items()]
    return ids


async def batch_metrics(emu: Emulator, ids: list[str]) -> tuple[int, Any]:
    """GET /sandboxes/metrics through the SDK's generated client (no high-level call uses it)."""
    config = ConnectionConfig(api_key=KEY, api_url=emu.url, request_timeout=5, retries=0)
    response = await get_sandboxes_metrics.asyncio_detailed(client=get_api_client(config), sandbox_ids=ids)
    return response.status_code, response.parsed


async def test_api_key_is_required(emulator: Emulator, http: aiohttp.ClientSession) -> None:
    emulator.add_sandbox("sbx")
    status, body = await request(http, "POST", f"{emulator.url}/sandboxes/sbx/pause", key=None)
    assert status == 401
    assert body["code"] == 401 and isinstance(body["message"], str)
    assert emulator.state_of("sbx") == "running"
    assert [c.status for c in emulator.calls("pause")] == [401]


async def test_only_the_configured_key_is_accepted(http: aiohttp.ClientSession) -> None:
    async with Emulator(api_key="e2b_right") as emu:
        emu.add_sandbox("sbx")
        wrong, _ = await request(http, "GET", f"{emu.url}/sandboxes/sbx", key="e2b_wrong")
        right, _ = await request(http, "GET", f"{emu.url}/sandboxes/sbx", key="e2b_right")
    assert (wrong, right) == (401, 200)


async def test_pause_answers_the_spec_codes(emulator: Emulator, http: aiohttp.ClientSession) -> None:
    emulator.add_sandbox("sbx")
    emulator.add_sandbox("hidden")
    emulator.faults.missing.add("hidden")
    url = f"{emulator.url}/sandboxes/{{}}/pause"
    first, body = await request(http, "POST", url.format("sbx"), json={"memory": True})
    assert (first, body) == (204, None)
    again, body = await request(http, "POST", url.format("sbx"))
    assert again == 409 and body["code"] == 409
    unknown, body = await request(http, "POST", url.format("nope"))
    assert unknown == 404 and body == {"code": 404, "message": "Sandbox nope not found"}
    hidden, _ = await request(http, "POST", url.format("hidden"))
    assert hidden == 404
    assert emulator.state_of("sbx") == "paused"
    assert emulator.state_of("hidden") == "running"
    assert [(c.op, c.sandbox_id, c.status) for c in emulator.calls()] == [
        ("pause", "sbx", 204),
        ("pause", "sbx", 409),
        ("pause", "nope", 404),
        ("pause", "hidden", 404),
    ]


async def test_resume_and_connect_codes(emulator: Emulator, http: aiohttp.ClientSession) -> None:
    emulator.add_sandbox("sbx", state="paused")
    base = f"{emulator.url}/sandboxes/sbx"
    assert (await request(http, "POST", f"{base}/resume", json={"timeout": 60}))[0] == 201
    assert (await request(http, "POST", f"{base}/resume", json={}))[0] == 409
    connect = f"{emulator.url}/v2/sandboxes/sbx/connect"
    assert (await request(http, "POST", connect, json={}))[0] == 200
    await request(http, "POST", f"{base}/pause")
    status, body = await request(http, "POST", connect, json={"timeout": 60})
    assert status == 201 and body["sandboxID"] == "sbx"
    assert emulator.state_of("sbx") == "running"


async def test_sdk_parses_info_create_connect_and_kill(emulator: Emulator) -> None:
    opts = sdk_opts(emulator)
    sandbox = await AsyncSandbox.create("python", metadata={"project": "p1"}, **opts)
    sandbox_id = sandbox.sandbox_id
    assert emulator.state_of(sandbox_id) == "running"
    assert await AsyncSandbox.pause(sandbox_id, **opts) is True
    info = await AsyncSandbox.get_info(sandbox_id, **opts)
    assert (info.sandbox_id, info.template_id) == (sandbox_id, "python")
    assert info.state == SandboxState.PAUSED
    assert info.metadata == {"project": "p1"}
    assert info.end_at > info.started_at
    connected = await AsyncSandbox.connect(sandbox_id, **opts)
    assert connected.sandbox_id == sandbox_id
    assert emulator.state_of(sandbox_id) == "running"
    assert await AsyncSandbox.kill(sandbox_id, **opts) is True
    assert await AsyncSandbox.kill(sandbox_id, **opts) is False
    assert emulator.state_of(sandbox_id) is None
    with pytest.raises(SandboxNotFoundException):
        await AsyncSandbox.get_info(sandbox_id, **opts)
    ops = [(c.op, c.status) for c in emulator.calls(sandbox_id=sandbox_id)]
    assert ops == [
        ("create", 201),
        ("pause", 204),
        ("info", 200),
        ("connect", 201),
        ("kill", 204),
        ("kill", 404),
        ("info", 404),
    ]


async def test_sdk_list_filters_and_pages(emulator: Emulator) -> None:
    for i in range(7):
        emulator.add_sandbox(f"run-{i}", metadata={"team": "a" if i % 2 else "b"})
    for i in range(3):
        emulator.add_sandbox(f"paused-{i}", state="paused", template="other")
    odd = {"k y": "50%41&x=1", "plus": "b+c"}
    emulator.add_sandbox("odd", state="paused", metadata=odd)

    running = await list_ids(emulator, SandboxQuery(state=[SandboxState.RUNNING]), 3)
    assert running == [f"run-{i}" for i in reversed(range(7))]  # newest first
    paused = await list_ids(emulator, SandboxQuery(state=[SandboxState.PAUSED]), None)
    assert sorted(paused) == ["odd", "paused-0", "paused-1", "paused-2"]
    assert len(await list_ids(emulator, None, 4)) == 11
    team_a = await list_ids(emulator, SandboxQuery(metadata={"team": "a"}), None)
    assert sorted(team_a) == ["run-1", "run-3", "run-5"]
    assert await list_ids(emulator, SandboxQuery(metadata=odd), None) == ["odd"]
    assert await list_ids(emulator, SandboxQuery(metadata={"k y": "50A&x=1"}), None) == []
    assert len(emulator.calls("list")) == 3 + 1 + 3 + 1 + 1 + 1


async def test_list_rejects_bad_queries(emulator: Emulator, http: aiohttp.ClientSession) -> None:
    base = f"{emulator.url}/v2/sandboxes"
    for query in ("state=sleeping", "limit=0", "limit=101", "nextToken=%%%", "order=up"):
        status, body = await request(http, "GET", f"{base}?{query}")
        assert status == 400 and body["code"] == 400, query


async def test_auto_create_makes_unknown_ids_exist_but_not_killed_ones(
    http: aiohttp.ClientSession,
) -> None:
    async with Emulator(auto_create=True) as emu:
        assert (await request(http, "POST", f"{emu.url}/sandboxes/new/pause"))[0] == 204
        assert emu.state_of("new") == "paused"
        assert (await request(http, "DELETE", f"{emu.url}/sandboxes/new"))[0] == 204
        assert (await request(http, "POST", f"{emu.url}/sandboxes/new/pause"))[0] == 404
        assert emu.state_of("new") is None


async def test_rate_limit_counts_admitted_calls_in_a_sliding_second(
    http: aiohttp.ClientSession,
) -> None:
    clock = FakeClock()
    async with Emulator(auto_create=True, faults=Faults(rate_limit=2), clock=clock) as emu:
        statuses = []
        for at in (0.0, 0.1, 0.2, 1.05, 1.06, 1.11):
            clock.now = at
            statuses.append((await request(http, "GET", f"{emu.url}/sandboxes/s"))[0])
        assert statuses == [200, 200, 429, 200, 429, 200]
        assert [c.at for c in emu.calls()] == [0.0, 0.1, 0.2, 1.05, 1.06, 1.11]


async def test_peak_rate_counts_calls_in_any_window(http: aiohttp.ClientSession) -> None:
    clock = FakeClock()
    async with Emulator(auto_create=True, clock=clock) as emu:
        for at in (0.0, 0.1, 0.5, 0.99, 1.5, 1.6, 3.0):
            clock.now = at
            await request(http, "POST", f"{emu.url}/sandboxes/s{at}/pause")
        clock.now = 3.2
        await request(http, "GET", f"{emu.url}/sandboxes/s3.0")
        assert emu.peak_rate("pause") == 4
        assert emu.peak_rate("pause", window=0.5) == 2
        assert emu.peak_rate("pause", window=0.01) == 1
        assert emu.peak_rate(window=0.3) == 2  # pause at 3.0 and info at 3.2
        assert emu.peak_rate("kill") == 0
        emu.reset_calls()
        assert emu.peak_rate() == 0 and emu.calls() == []


async def test_error_rate_answers_5xx_with_error_body(
    emulator: Emulator, http: aiohttp.ClientSession
) -> None:
    emulator.add_sandbox("sbx")
    emulator.faults.error_rate = 1.0
    seen = set()
    for _ in range(20):
        status, body = await request(http, "POST", f"{emulator.url}/sandboxes/sbx/pause")
        assert body["code"] == status
        seen.add(status)
    assert seen <= {500, 502, 503} and len(seen) > 1
    assert emulator.state_of("sbx") == "running"


async def test_faults_are_checked_in_order(emulator: Emulator, http: aiohttp.ClientSession) -> None:
    emulator.add_sandbox("sbx")
    emulator.faults.rate_limit = 1
    emulator.faults.error_rate = 1.0
    emulator.faults.latency = 30.0  # never reached: 429 and 5xx come first
    first, _ = await request(http, "GET", f"{emulator.url}/sandboxes/sbx")
    second, _ = await request(http, "GET", f"{emulator.url}/sandboxes/sbx")
    assert first in {500, 502, 503} and second == 429


async def test_latency_delays_every_answer(emulator: Emulator, http: aiohttp.ClientSession) -> None:
    emulator.add_sandbox("sbx")
    emulator.faults.latency = 0.2
    started = time.monotonic()
    await asyncio.gather(*(request(http, "GET", f"{emulator.url}/sandboxes/sbx") for _ in range(10)))
    elapsed = time.monotonic() - started
    assert 0.2 <= elapsed < 2.0  # concurrent, not one after another


async def test_hung_call_is_recorded_and_stop_releases_it(http: aiohttp.ClientSession) -> None:
    emu = Emulator(faults=Faults(timeout_rate=1.0))
    await emu.start()
    emu.add_sandbox("sbx")
    pending = asyncio.create_task(request(http, "POST", f"{emu.url}/sandboxes/sbx/pause"))
    await wait_for(lambda: len(emu.calls()) == 1, timeout=5, what="the hung call recorded")
    assert emu.calls()[0].status == 0
    assert not pending.done()
    async with asyncio.timeout(5):  # hang_seconds is 3600
        await emu.stop()
        status, _ = await pending
    assert status == 504
    assert emu.state_of("sbx") == "running"


async def test_client_timeout_against_hang(emulator: Emulator) -> None:
    emulator.add_sandbox("sbx")
    emulator.faults.timeout_rate = 1.0
    timeout = aiohttp.ClientTimeout(total=0.3)
    async with aiohttp.ClientSession(timeout=timeout) as short:
        with pytest.raises(TimeoutError):
            await request(short, "POST", f"{emulator.url}/sandboxes/sbx/pause")
    assert [c.status for c in emulator.calls()] == [0]


async def test_control_api(emulator: Emulator, http: aiohttp.ClientSession) -> None:
    ctl = f"{emulator.url}/_emulator"
    status, body = await request(
        http, "POST", f"{ctl}/sandboxes", key=None, json={"sandbox_id": "c1", "state": "paused"}
    )
    assert status == 201 and (body["sandbox_id"], body["state"]) == ("c1", "paused")
    assert emulator.state_of("c1") == "paused"
    bad, _ = await request(
        http, "POST", f"{ctl}/sandboxes", key=None, json={"sandbox_id": "c2", "state": "zombie"}
    )
    assert bad == 400
    assert (await request(http, "GET", f"{ctl}/sandboxes/c1", key=None))[1] == body
    assert (await request(http, "GET", f"{ctl}/sandboxes/zz", key=None))[1]["state"] is None

    status, faults = await request(
        http, "PUT", f"{ctl}/faults", key=None, json={"latency": 0.01, "missing": ["c1"]}
    )
    assert status == 200 and faults["latency"] == 0.01 and faults["missing"] == ["c1"]
    assert emulator.faults.latency == 0.01 and emulator.faults.missing == {"c1"}
    assert emulator.faults.error_rate == 0.0
    for wrong in ({"latncy": 1}, {"error_rate": 2}, {"latency": -1}, {"missing": "c1"}):
        assert (await request(http, "PUT", f"{ctl}/faults", key=None, json=wrong))[0] == 400
    assert emulator.faults.latency == 0.01

    await request(http, "POST", f"{emulator.url}/sandboxes/c1/pause")
    await request(http, "GET", f"{emulator.url}/sandboxes/other")
    _, calls = await request(http, "GET", f"{ctl}/calls?op=pause&sandbox_id=c1", key=None)
    assert [(c["method"], c["op"], c["sandbox_id"], c["status"]) for c in calls] == [
        ("POST", "pause", "c1", 404)
    ]
    assert Call(**calls[0]) == emulator.calls("pause")[0]
    _, all_calls = await request(http, "GET", f"{ctl}/calls", key=None)
    assert len(all_calls) == 2
    _, peak = await request(http, "GET", f"{ctl}/peak-rate?op=pause&window=10", key=None)
    assert peak == {"peak": 1}

    assert (await request(http, "POST", f"{ctl}/reset", key=None))[0] == 200
    assert emulator.calls() == [] and emulator.faults.latency == 0.01
    await request(http, "POST", f"{ctl}/reset", key=None, json={"faults": True, "sandboxes": True})
    assert emulator.faults == Faults() and emulator.state_of("c1") is None


# -- sizes, lifetimes and metrics, through the real SDK --------------------------------


async def test_sdk_list_and_info_answer_sizes_lifetime_and_state(emulator: Emulator) -> None:
    emulator.add_sandbox("big", cpu_count=8, memory_mb=4096, timeout=600, metadata={"team": "a"})
    emulator.add_sandbox("small", metadata={"team": "a"})
    emulator.add_sandbox("other", metadata={"team": "b"})
    emulator.add_sandbox("asleep", state="paused", metadata={"team": "a"})
    query = SandboxQuery(state=[SandboxState.RUNNING], metadata={"team": "a"})
    paginator = AsyncSandbox.list(query=query, limit=1, **sdk_opts(emulator))
    pages = []
    while paginator.has_next:
        pages.append(await paginator.next_items())
    assert [[info.sandbox_id for info in page] for page in pages] == [["small"], ["big"]]
    small, big = pages[0][0], pages[1][0]
    assert (big.cpu_count, big.memory_mb, big.state) == (8, 4096, SandboxState.RUNNING)
    assert (big.started_at, big.end_at, big.metadata) == (T0, T0 + timedelta(seconds=600), {"team": "a"})
    assert (small.cpu_count, small.memory_mb, small.end_at) == (2, 512, T0 + timedelta(seconds=300))
    info = await AsyncSandbox.get_info("asleep", **sdk_opts(emulator))
    assert (info.state, info.cpu_count, info.memory_mb, info.metadata) == (
        SandboxState.PAUSED,
        2,
        512,
        {"team": "a"},
    )
    assert [(c.op, c.status) for c in emulator.calls()] == [("list", 200)] * 2 + [("info", 200)]


async def test_sdk_connect_moves_a_running_sandbox_end_only_later(emulator: Emulator, wall: FakeWall) -> None:
    opts = sdk_opts(emulator)
    emulator.add_sandbox("sbx", timeout=600)

    async def end_at() -> datetime:
        return (await AsyncSandbox.get_info("sbx", **opts)).end_at

    await AsyncSandbox.connect("sbx", timeout=60, **opts)
    assert await end_at() == T0 + timedelta(seconds=600)
    later = wall.advance(100)
    await AsyncSandbox.connect("sbx", timeout=1000, **opts)
    assert await end_at() == later + timedelta(seconds=1000)
    await AsyncSandbox.connect("sbx", **opts)  # the SDK sends no timeout: 300 s, sooner
    assert await end_at() == later + timedelta(seconds=1000)
    assert [c.status for c in emulator.calls("connect")] == [200, 200, 200]


async def test_sdk_connect_resumes_a_paused_sandbox_with_a_new_end(
    emulator: Emulator, wall: FakeWall
) -> None:
    opts = sdk_opts(emulator)
    emulator.add_sandbox("long", state="paused", timeout=3600)
    emulator.add_sandbox("plain", state="paused", timeout=3600)
    now = wall.advance(10)
    resumed = await AsyncSandbox.connect("long", timeout=60, **opts)
    assert resumed.sandbox_id == "long"
    info = await AsyncSandbox.get_info("long", **opts)
    assert info.state == SandboxState.RUNNING
    assert info.end_at == now + timedelta(seconds=60)  # the end before the pause does not carry over
    await AsyncSandbox.connect("plain", **opts)
    plain = emulator.sandbox("plain")
    assert plain is not None and plain.end_at == now + timedelta(seconds=300)
    assert [(c.sandbox_id, c.status) for c in emulator.calls("connect")] == [("long", 201), ("plain", 201)]


async def test_lifetime_bodies_are_checked_and_resume_defaults_to_15_s(
    emulator: Emulator, wall: FakeWall, http: aiohttp.ClientSession
) -> None:
    emulator.add_sandbox("sbx", state="paused", timeout=3600)
    base = f"{emulator.url}/sandboxes/sbx"
    for wrong in ({"timeout": -1}, {"timeout": "60"}, {"timeout": 1.5}):
        assert (await request(http, "POST", f"{base}/resume", json=wrong))[0] == 400, wrong
        assert (await request(http, "POST", f"{base}/connect", json=wrong))[0] == 400, wrong
    assert emulator.state_of("sbx") == "paused"
    now = wall.advance(5)
    assert (await request(http, "POST", f"{base}/resume", json={}))[0] == 201
    resumed = emulator.sandbox("sbx")
    assert resumed is not None and resumed.end_at == now + timedelta(seconds=15)


async def test_sdk_get_metrics_samples_a_run_every_five_seconds(emulator: Emulator, wall: FakeWall) -> None:
    opts = sdk_opts(emulator)
    emulator.add_sandbox(
        "sbx",
        cpu_count=4,
        memory_mb=1024,
        mem_used_mb=256,
        disk_size_mb=2048,
        disk_used_mb=512,
        cpu_used_pct=12.5,
    )
    wall.advance(13)  # T0 is 2 s past a multiple of 5
    metrics = await AsyncSandbox.get_metrics("sbx", **opts)
    assert [int(m.timestamp.timestamp()) - T0_UNIX for m in metrics] == [0, 3, 8, 13]
    last = metrics[-1]
    assert (last.cpu_count, last.cpu_used_pct, last.mem_used, last.mem_total) == (
        4,
        12.5,
        256 * MIB,
        1024 * MIB,
    )
    assert (last.disk_used, last.disk_total, last.mem_cache) == (512 * MIB, 2048 * MIB, 0)
    window = await AsyncSandbox.get_metrics(
        "sbx", start=T0 + timedelta(seconds=3), end=T0 + timedelta(seconds=8), **opts
    )
    assert [int(m.timestamp.timestamp()) - T0_UNIX for m in window] == [3, 8]
    with pytest.raises(SandboxNotFoundException):
        await AsyncSandbox.get_metrics("nope", **opts)
    assert [(c.op, c.sandbox_id, c.status) for c in emulator.calls()] == [
        ("sandbox_metrics", "sbx", 200),
        ("sandbox_metrics", "sbx", 200),
        ("sandbox_metrics", "nope", 404),
    ]


async def test_sdk_pause_stops_the_samples_and_a_resume_starts_a_new_run(
    emulator: Emulator, wall: FakeWall
) -> None:
    opts = sdk_opts(emulator)
    emulator.add_sandbox("sbx")
    wall.advance(12)
    assert await AsyncSandbox.pause("sbx", **opts) is True
    wall.advance(100)

    async def sample_times() -> list[int]:
        return [int(m.timestamp.timestamp()) - T0_UNIX for m in await AsyncSandbox.get_metrics("sbx", **opts)]

    assert await sample_times() == [0, 3, 8]  # nothing fresh while paused
    await AsyncSandbox.connect("sbx", **opts)
    assert await sample_times() == [112]  # only the latest run is kept


async def test_batch_metrics_answer_the_latest_sample_of_each_sandbox(
    emulator: Emulator, wall: FakeWall
) -> None:
    for sandbox_id in ("busy", "idle", "asleep"):
        emulator.add_sandbox(sandbox_id)
    wall.advance(30)
    emulator.pause_outside("asleep")  # its last sample: at T0 + 28, a multiple of 5
    wall.advance(60)
    emulator.set_cpu("busy", 95)
    emulator.set_cpu("idle", 3, sample_age=42)
    status, parsed = await batch_metrics(emulator, ["busy", "idle", "asleep", "unknown"])
    assert status == 200 and isinstance(parsed, SandboxesWithMetrics)
    latest = parsed.sandboxes
    assert set(latest) == {"busy", "idle", "asleep"}  # unknown ids are left out
    assert set(latest["busy"]) == {
        "timestamp",
        "timestampUnix",
        "cpuCount",
        "cpuUsedPct",
        "memUsed",
        "memTotal",
        "memCache",
        "diskUsed",
        "diskTotal",
    }
    busy = SandboxMetric.from_dict(latest["busy"])
    assert (busy.cpu_used_pct, busy.timestamp_unix, busy.cpu_count) == (95, T0_UNIX + 88, 2)
    assert busy.timestamp == datetime.fromtimestamp(T0_UNIX + 88, UTC)
    assert (latest["idle"]["cpuUsedPct"], latest["idle"]["timestampUnix"]) == (3, T0_UNIX + 90 - 42)
    assert latest["asleep"]["timestampUnix"] == T0_UNIX + 28

    emulator.resume_outside("asleep")
    emulator.set_cpu("idle", 3)  # fresh again
    _, parsed = await batch_metrics(emulator, ["idle", "asleep"])
    stamps = {sandbox_id: sample["timestampUnix"] for sandbox_id, sample in parsed.sandboxes.items()}
    assert stamps == {"idle": T0_UNIX + 88, "asleep": T0_UNIX + 90}

    status, too_many = await batch_metrics(emulator, [f"s{i}" for i in range(101)])
    assert status == 400 and isinstance(too_many, Error)
    status, hundred = await batch_metrics(emulator, ["busy", *(f"s{i}" for i in range(99))])
    assert status == 200 and set(hundred.sandboxes) == {"busy"}
    assert [(c.op, c.sandbox_id, c.status) for c in emulator.calls()] == [
        ("metrics", None, 200),
        ("metrics", None, 200),
        ("metrics", None, 400),
        ("metrics", None, 200),
    ]


async def test_batch_metrics_reject_bad_id_lists(emulator: Emulator, http: aiohttp.ClientSession) -> None:
    base = f"{emulator.url}/sandboxes/metrics"
    for query in ("", "?sandbox_ids=", "?sandbox_ids=a,,b", "?sandbox_ids=a,a"):
        status, body = await request(http, "GET", base + query)
        assert status == 400 and body["code"] == 400, query
    status, body = await request(http, "GET", f"{emulator.url}/sandboxes/x/metrics?start=9&end=3")
    assert status == 400 and body["code"] == 400


# -- faults ---------------------------------------------------------------------------


async def test_service_busy_503_reaches_the_sdk_as_service_busy(emulator: Emulator) -> None:
    emulator.add_sandbox("sbx")
    emulator.faults.update({"error_rate": 1.0, "error_statuses": [503]})
    for _ in range(5):
        with pytest.raises(ServiceBusyException):
            await AsyncSandbox.pause("sbx", **sdk_opts(emulator))
    assert [c.status for c in emulator.calls("pause")] == [503] * 5
    assert emulator.state_of("sbx") == "running"


async def test_op_latency_slows_only_its_op(emulator: Emulator) -> None:
    opts = sdk_opts(emulator)
    emulator.add_sandbox("sbx")
    emulator.faults.latency = 0.05
    emulator.faults.op_latency = {"pause": 1.0}
    started = time.monotonic()
    pausing = asyncio.create_task(AsyncSandbox.pause("sbx", **opts))
    info = await AsyncSandbox.get_info("sbx", **opts)
    assert info.state == SandboxState.RUNNING and not pausing.done()
    assert await pausing is True
    assert time.monotonic() - started >= 1.05
    assert emulator.state_of("sbx") == "paused"


async def test_list_fail_after_fails_the_paginator_on_page_two(
    emulator: Emulator, http: aiohttp.ClientSession
) -> None:
    for i in range(5):
        emulator.add_sandbox(f"sbx-{i}")
    emulator.faults.list_fail_after = 1
    paginator = AsyncSandbox.list(limit=2, **sdk_opts(emulator))
    assert len(await paginator.next_items()) == 2 and paginator.has_next
    for _ in range(2):  # it keeps failing until the fault is set again
        with pytest.raises(SandboxException) as failed:
            await paginator.next_items()
        assert failed.value.status_code == 500
    status, faults = await request(
        http, "PUT", f"{emulator.url}/_emulator/faults", key=None, json={"list_fail_after": 3}
    )
    assert status == 200 and faults["list_fail_after"] == 3
    assert len(await list_ids(emulator, None, 2)) == 5  # three pages: a new count
    with pytest.raises(SandboxException):
        await list_ids(emulator, None, 2)
    assert [c.status for c in emulator.calls("list")] == [200, 500, 500, 200, 200, 200, 500]


async def test_new_fault_fields_are_checked(emulator: Emulator, http: aiohttp.ClientSession) -> None:
    url = f"{emulator.url}/_emulator/faults"
    wrong: dict[str, Any]
    for wrong in (
        {"error_statuses": []},
        {"error_statuses": [200]},
        {"error_statuses": ["503"]},
        {"op_latency": {"pasue": 1}},
        {"op_latency": {"pause": -1}},
        {"op_latency": [1]},
        {"list_fail_after": -1},
        {"list_fail_after": 1.5},
        {"list_fail_after": True},
    ):
        assert (await request(http, "PUT", url, key=None, json=wrong))[0] == 400, wrong
    assert emulator.faults == Faults()
    good = {"error_statuses": [503], "op_latency": {"pause": 2, "metrics": 0.5}, "list_fail_after": 0}
    status, faults = await request(http, "PUT", url, key=None, json=good)
    assert status == 200
    assert (faults["error_statuses"], faults["op_latency"], faults["list_fail_after"]) == (
        [503],
        {"pause": 2.0, "metrics": 0.5},
        0,
    )
    assert emulator.faults.op_latency == {"pause": 2.0, "metrics": 0.5}
    with pytest.raises(ValueError):
        Faults(error_statuses=[200])


async def test_every_call_is_logged_with_its_action_and_fault(
    emulator: Emulator, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="e2b_emulator")
    emulator.add_sandbox("sbx")
    await request(http, "GET", f"{emulator.url}/sandboxes/sbx")
    emulator.faults.update({"error_rate": 1.0, "error_statuses": [503]})
    await request(http, "POST", f"{emulator.url}/sandboxes/sbx/pause")
    emulator.pause_outside("sbx")
    logged = [
        (
            getattr(r, "action", None),
            getattr(r, "op", None),
            getattr(r, "sandbox_id", None),
            getattr(r, "status", None),
            getattr(r, "fault", None),
        )
        for r in caplog.records
        if getattr(r, "action", "").startswith("emulator.")
    ]
    assert logged == [
        ("emulator.added", None, "sbx", None, None),
        ("emulator.call", "info", "sbx", 200, None),
        ("emulator.call", "pause", "sbx", 503, "error"),
        ("emulator.paused_outside", None, "sbx", None, None),
    ]


# -- control API: sandboxes and actions outside the API ---------------------------------


async def test_control_api_creates_sized_sandboxes_and_sets_cpu(
    emulator: Emulator, http: aiohttp.ClientSession
) -> None:
    ctl = f"{emulator.url}/_emulator/sandboxes"
    spec = {
        "sandbox_id": "c1",
        "template": "py",
        "metadata": {"p": "1"},
        "cpu_count": 4,
        "memory_mb": 2048,
        "timeout": 120,
        "cpu_used_pct": 10,
    }
    status, created = await request(http, "POST", ctl, key=None, json=spec)
    assert status == 201
    assert created == {
        "sandbox_id": "c1",
        "state": "running",
        "template": "py",
        "metadata": {"p": "1"},
        "started_at": T0.isoformat(),
        "end_at": (T0 + timedelta(seconds=120)).isoformat(),
        "cpu_count": 4,
        "memory_mb": 2048,
        "disk_size_mb": 10240,
        "cpu_used_pct": 10.0,
        "mem_used_mb": 512,
        "disk_used_mb": 2560,
        "pause_mode": None,
        "paused_at": None,
        "latest_sample": T0.isoformat(),
    }
    for wrong in (
        {"cpu_count": 0},
        {"cpu_count": "4"},
        {"colour": "red"},
        {"metadata": {"a": 1}},
        {"state": "zombie"},
        {"memory_mb": 256, "mem_used_mb": 512},
        {"timeout": -5},
    ):
        status, _ = await request(http, "POST", ctl, key=None, json={"sandbox_id": "c2", **wrong})
        assert status == 400, wrong
    assert emulator.sandbox("c2") is None

    status, changed = await request(
        http, "PUT", f"{ctl}/c1/cpu", key=None, json={"cpu_used_pct": 95, "sample_age": 20}
    )
    assert status == 200
    assert (changed["cpu_used_pct"], changed["latest_sample"]) == (
        95.0,
        (T0 - timedelta(seconds=20)).isoformat(),
    )
    for wrong in (
        {"cpu_used_pct": 101},
        {},
        {"cpu_used_pct": 5, "sample_age": -1},
        {"cpu_used_pct": 5, "x": 1},
    ):
        assert (await request(http, "PUT", f"{ctl}/c1/cpu", key=None, json=wrong))[0] == 400, wrong
    assert (await request(http, "PUT", f"{ctl}/nope/cpu", key=None, json={"cpu_used_pct": 5}))[0] == 404
    [sample] = await AsyncSandbox.get_metrics("c1", **sdk_opts(emulator))
    assert (sample.cpu_used_pct, sample.timestamp) == (95, T0 - timedelta(seconds=20))
    assert [c.op for c in emulator.calls()] == ["sandbox_metrics"]


async def test_outside_actions_over_http_are_not_api_calls(
    emulator: Emulator, wall: FakeWall, http: aiohttp.ClientSession
) -> None:
    emulator.add_sandbox("s", timeout=3600)
    ctl = f"{emulator.url}/_emulator/sandboxes/s"
    for _ in range(2):  # pausing a paused sandbox leaves it as it is
        status, paused = await request(http, "POST", f"{ctl}/pause", key=None)
        assert status == 200 and (paused["state"], paused["paused_at"]) == ("paused", T0.isoformat())
    info = await AsyncSandbox.get_info("s", **sdk_opts(emulator))
    assert info.state == SandboxState.PAUSED
    now = wall.advance(30)
    assert (await request(http, "POST", f"{ctl}/resume", key=None, json={"timeout": -1}))[0] == 400
    status, resumed = await request(http, "POST", f"{ctl}/resume", key=None, json={"timeout": 90})
    assert status == 200 and resumed["state"] == "running"
    assert resumed["end_at"] == (now + timedelta(seconds=90)).isoformat()
    status, killed = await request(http, "POST", f"{ctl}/kill", key=None)
    assert (status, killed) == (200, {"sandbox_id": "s", "state": None})
    for action in ("pause", "resume", "kill"):
        assert (await request(http, "POST", f"{ctl}/{action}", key=None))[0] == 404, action
    assert (await request(http, "GET", ctl, key=None))[1] == {"sandbox_id": "s", "state": None}
    assert [c.op for c in emulator.calls()] == ["info"]  # zero pause, resume or kill calls


async def test_python_outside_actions_and_immutable_snapshots(emulator: Emulator, wall: FakeWall) -> None:
    snapshot = emulator.add_sandbox("s", metadata={"k": "v"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        snapshot.state = "paused"  # type: ignore[misc]
    with pytest.raises(TypeError):
        snapshot.metadata["k"] = "w"  # type: ignore[index]
    paused = emulator.pause_outside("s")
    assert (paused.state, paused.pause_mode, snapshot.state) == ("paused", "full", "running")
    listed = await list_ids(emulator, SandboxQuery(state=[SandboxState.PAUSED]), None)
    assert listed == ["s"]
    now = wall.advance(7)
    resumed = emulator.resume_outside("s", timeout=50)
    assert (resumed.state, resumed.end_at, resumed.latest_sample) == (
        "running",
        now + timedelta(seconds=50),
        now,
    )
    emulator.kill_outside("s")
    assert emulator.sandbox("s") is None and emulator.state_of("s") is None
    for act in (emulator.kill_outside, emulator.pause_outside, emulator.resume_outside):
        with pytest.raises(LookupError):
            act("s")
    with pytest.raises(LookupError):
        emulator.set_cpu("s", 50)
    assert [c.op for c in emulator.calls()] == ["list"]


async def test_serve_logs_its_url_and_stops_on_cancel(
    caplog: pytest.LogCaptureFixture, http: aiohttp.ClientSession
) -> None:
    caplog.set_level(logging.INFO, logger="e2b_emulator")
    task = asyncio.create_task(serve("127.0.0.1", 0, Faults(), True))

    def listening() -> list[logging.LogRecord]:
        return [r for r in caplog.records if getattr(r, "action", None) == "emulator.listening"]

    await wait_for(listening, timeout=5, what="the emulator listening")
    url = listening()[0].__dict__["url"]
    assert (await request(http, "POST", f"{url}/sandboxes/any/pause"))[0] == 204
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with pytest.raises(aiohttp.ClientConnectionError):
        await request(http, "GET", f"{url}/sandboxes/any")

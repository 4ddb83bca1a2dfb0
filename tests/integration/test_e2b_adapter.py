"""The E2B adapter, through the real e2b SDK, against the emulator."""

from __future__ import annotations

import asyncio
import time

import pytest

from consumer.e2b_adapter import CallOutcome, CallResult, E2BClient
from consumer.errors import E2BError
from e2b_emulator import Emulator, Faults

from ..helpers.config import E2B_KEY
from ..helpers.processes import free_port

pytestmark = pytest.mark.isolated  # the emulator only


@pytest.fixture
def client(emulator: Emulator) -> E2BClient:
    return E2BClient(api_key=E2B_KEY, api_url=emulator.url, request_timeout=5)


async def test_pause_running_then_again(emulator: Emulator, client: E2BClient) -> None:
    emulator.add_sandbox("sbx")
    first = await client.pause("sbx")
    assert first.outcome is CallOutcome.PAUSED and first.error is None
    assert 0 < first.latency < 5
    assert emulator.state_of("sbx") == "paused"
    again = await client.pause("sbx")
    assert again.outcome is CallOutcome.ALREADY_PAUSED
    assert [(c.method, c.status) for c in emulator.calls("pause", "sbx")] == [
        ("POST", 204),
        ("POST", 409),
    ]


async def test_filesystem_mode_reaches_the_api(emulator: Emulator) -> None:
    emulator.add_sandbox("sbx")
    client = E2BClient(api_key=E2B_KEY, api_url=emulator.url, request_timeout=5, memory=False)
    assert (await client.pause("sbx")).outcome is CallOutcome.PAUSED
    paused = emulator.sandbox("sbx")
    assert paused is not None and paused.pause_mode == "filesystem"


async def test_unknown_and_missing_are_gone(emulator: Emulator, client: E2BClient) -> None:
    emulator.add_sandbox("hidden")
    emulator.faults.missing.add("hidden")
    assert (await client.pause("nope")).outcome is CallOutcome.GONE
    assert (await client.pause("hidden")).outcome is CallOutcome.GONE
    assert emulator.state_of("hidden") == "running"


async def test_rate_limited_is_retryable_and_sent_once(emulator: Emulator, client: E2BClient) -> None:
    emulator.add_sandbox("a")
    emulator.add_sandbox("b")
    emulator.faults.rate_limit = 1
    assert (await client.pause("a")).outcome is CallOutcome.PAUSED
    limited = await client.pause("b")
    assert limited.outcome is CallOutcome.RETRYABLE
    assert limited.error is not None and "429" in limited.error
    assert [c.status for c in emulator.calls("pause", "b")] == [429]  # no SDK retry
    assert emulator.state_of("b") == "running"


async def test_server_errors_are_retryable_and_sent_once(emulator: Emulator, client: E2BClient) -> None:
    emulator.add_sandbox("sbx")
    emulator.faults.error_rate = 1.0
    results = [await client.pause("sbx") for _ in range(8)]
    assert {r.outcome for r in results} == {CallOutcome.RETRYABLE}
    statuses = [c.status for c in emulator.calls("pause")]
    assert len(statuses) == 8 and set(statuses) <= {500, 502, 503}
    assert emulator.state_of("sbx") == "running"


async def test_hang_times_out_as_retryable(emulator: Emulator) -> None:
    emulator.add_sandbox("sbx")
    emulator.faults.timeout_rate = 1.0
    client = E2BClient(api_key=E2B_KEY, api_url=emulator.url, request_timeout=0.5)
    started = time.monotonic()
    result = await client.pause("sbx")
    elapsed = time.monotonic() - started
    assert result.outcome is CallOutcome.RETRYABLE
    assert result.error is not None and "Timeout" in result.error
    assert 0.4 < elapsed < 1.5  # request_timeout bounds the whole call
    assert [c.status for c in emulator.calls("pause")] == [0]


async def test_refused_connection_is_retryable() -> None:
    client = E2BClient(api_key=E2B_KEY, api_url=f"http://127.0.0.1:{free_port()}", request_timeout=1)
    async with asyncio.timeout(3):
        result = await client.pause("sbx")
    assert result.outcome is CallOutcome.RETRYABLE


async def test_wrong_key_fails_and_is_not_echoed(emulator: Emulator) -> None:
    emulator.add_sandbox("sbx")
    client = E2BClient(api_key="e2b_wrong_secret", api_url=emulator.url, request_timeout=5)
    result = await client.pause("sbx")
    assert result.outcome is CallOutcome.FAILED
    assert result.error is not None and "401" in result.error
    assert "e2b_wrong_secret" not in result.error
    assert [c.status for c in emulator.calls()] == [401]
    with pytest.raises(E2BError) as raised:
        await client.state("sbx")
    assert raised.value.retryable is False


async def test_missing_key_fails_without_a_request(emulator: Emulator) -> None:
    client = E2BClient(api_key="", api_url=emulator.url, request_timeout=5)
    assert (await client.pause("sbx")).outcome is CallOutcome.FAILED
    with pytest.raises(E2BError):
        await client.connect("sbx")
    assert emulator.calls() == []


async def test_key_is_scrubbed_from_error_texts() -> None:
    # The URL, and so the connection error, carries the key here; the timeout
    # leaves the SDK time to give up connecting rather than time out.
    url = f"http://127.0.0.1:{free_port()}/{E2B_KEY}"
    client = E2BClient(api_key=E2B_KEY, api_url=url, request_timeout=5)
    result = await client.pause("sbx")
    assert result.outcome is CallOutcome.RETRYABLE
    assert result.error is not None and "***" in result.error
    assert result.error.startswith("ConnectError") and E2B_KEY not in result.error
    with pytest.raises(E2BError) as raised:
        await client.state("sbx")
    assert raised.value.retryable is True
    assert E2B_KEY not in str(raised.value)
    assert raised.value.__cause__ is None and raised.value.__suppress_context__


async def test_connect_resumes_a_paused_sandbox(emulator: Emulator, client: E2BClient) -> None:
    emulator.add_sandbox("sbx", state="paused")
    assert await client.state("sbx") == "paused"
    assert await client.connect("sbx") is True
    assert emulator.state_of("sbx") == "running"
    assert await client.state("sbx") == "running"
    assert await client.connect("nope") is False
    assert [c.status for c in emulator.calls("connect")] == [201, 404]


async def test_kill_then_state_is_none(emulator: Emulator, client: E2BClient) -> None:
    emulator.add_sandbox("sbx")
    assert await client.kill("sbx") is True
    assert emulator.state_of("sbx") is None
    assert await client.state("sbx") is None
    assert await client.kill("sbx") is False
    assert (await client.pause("sbx")).outcome is CallOutcome.GONE


async def test_other_calls_raise_retryable_errors(emulator: Emulator, client: E2BClient) -> None:
    emulator.add_sandbox("sbx")
    emulator.faults.error_rate = 1.0
    for call in (client.state, client.connect, client.kill):
        with pytest.raises(E2BError) as raised:
            await call("sbx")
        assert raised.value.retryable is True
    assert emulator.state_of("sbx") == "running"
    assert len(emulator.calls()) == 3


async def test_concurrent_pauses_are_each_one_request() -> None:
    async with Emulator(auto_create=True, faults=Faults(latency=0.05)) as emu:
        client = E2BClient(api_key=E2B_KEY, api_url=emu.url, request_timeout=5)
        results = await asyncio.gather(*(client.pause(f"s{i}") for i in range(200)))
        assert all(r == CallResult(CallOutcome.PAUSED, None, r.latency) for r in results)
        assert len(emu.calls("pause")) == 200
        assert emu.peak_rate("pause", window=10) == 200

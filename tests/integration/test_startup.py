"""A worker checks its E2B key and URL with one read at start: a wrong one stops it at once, by name."""

from __future__ import annotations

import asyncio
import time

import pytest

from consumer.e2b_adapter import Access, AccessCheck, E2BClient
from consumer.settings import Settings
from e2b_emulator import Emulator, Faults

from ..helpers.config import E2B_KEY
from ..helpers.processes import Spawn, autopause, cli, free_port, isolated_env
from ..helpers.waiting import wait_for

WRONG_KEY = "e2b_wrong_key_0123456789"


# -- the adapter against the emulator ----------------------------------------------------------


@pytest.mark.isolated
async def test_the_access_check_is_one_read_with_the_key(emulator: Emulator) -> None:
    good = E2BClient(api_key=E2B_KEY, api_url=emulator.url, request_timeout=5)
    assert await good.check_access() == AccessCheck(Access.OK)
    assert [(c.method, c.op, c.status) for c in emulator.calls()] == [("GET", "list", 200)]
    wrong = await E2BClient(api_key=WRONG_KEY, api_url=emulator.url, request_timeout=5).check_access()
    assert wrong.access is Access.BAD_KEY and wrong.error is not None and WRONG_KEY not in wrong.error
    emulator.faults = Faults(error_rate=1.0, error_statuses=[503])
    assert (await good.check_access()).access is Access.UNSURE
    closed = E2BClient(api_key=E2B_KEY, api_url=f"http://127.0.0.1:{free_port()}", request_timeout=5)
    assert (await closed.check_access()).access is Access.UNREACHABLE


# -- the worker as a process -------------------------------------------------------------------


async def test_a_worker_with_a_wrong_key_exits_2_naming_the_variable_before_anything_else(
    settings: Settings, emulator: Emulator
) -> None:
    started = time.monotonic()
    # RabbitMQ is unreachable too: the key is checked first, so the worker does not wait for it
    done = await cli(
        settings,
        "run",
        "worker",
        AUTOPAUSE_E2B_API_URL=emulator.url,
        AUTOPAUSE_E2B_API_KEY=WRONG_KEY,
        AUTOPAUSE_AMQP_URL=f"amqp://guest:guest@127.0.0.1:{free_port()}/",
    )
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"autopause: E2B at {emulator.url} refused the API key")
    assert last.endswith("check AUTOPAUSE_E2B_API_KEY (or E2B_API_KEY)")
    assert WRONG_KEY not in done.stdout + done.stderr
    assert [(c.op, c.status) for c in emulator.calls()] == [("list", 401)]
    assert time.monotonic() - started < 20


async def test_a_worker_that_cannot_reach_e2b_retries_then_exits_naming_the_url(settings: Settings) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    done = await cli(
        settings,
        "run",
        "worker",
        AUTOPAUSE_E2B_API_URL=url,
        AUTOPAUSE_E2B_API_KEY=E2B_KEY,
        AUTOPAUSE_STARTUP_PATIENCE="4",  # a connection attempt takes the SDK about 2.5 s
    )
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith(f"autopause: cannot reach the E2B API at {url} (")
    assert lines[-1].endswith("check AUTOPAUSE_E2B_API_URL")
    assert any("e2b.unreachable" in line and "retrying" in line for line in lines[:-1]), done.stderr


async def test_a_worker_waits_for_an_e2b_api_that_starts_after_it(
    settings: Settings, channel: object, spawn: Spawn
) -> None:
    port = free_port()
    env = isolated_env(
        settings,
        AUTOPAUSE_E2B_API_URL=f"http://127.0.0.1:{port}",
        AUTOPAUSE_E2B_API_KEY=E2B_KEY,
        AUTOPAUSE_STARTUP_PATIENCE="60",
    )
    worker = spawn(autopause("run", "worker", "--burst"), env)
    await wait_for(lambda: "E2B API unreachable, retrying" in worker.output(), what="the worker retrying E2B")
    assert worker.alive()
    async with Emulator(port=port, api_key=E2B_KEY) as emulator:
        assert await worker.wait(60) == 0, worker.output()
        assert [(c.op, c.status) for c in emulator.calls()] == [("list", 200)]
    assert "E2B accepts the API key" in worker.output()


async def test_a_dry_run_worker_and_the_built_in_emulator_make_no_check(
    settings: Settings, channel: object
) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    dry = await cli(
        settings,
        "run",
        "worker",
        "--burst",
        "--dry-run",
        AUTOPAUSE_E2B_API_URL=closed,
        AUTOPAUSE_E2B_API_KEY=E2B_KEY,
    )
    assert dry.returncode == 0, dry.stderr
    assert "e2b.unreachable" not in dry.stdout + dry.stderr
    built_in = await cli(settings, "run", "worker", "--burst", "--emulator")
    assert built_in.returncode == 0, built_in.stderr
    assert "e2b.unreachable" not in built_in.stdout + built_in.stderr


async def test_a_worker_that_met_an_unreachable_e2b_exits_with_its_code_not_an_abort(
    settings: Settings,
) -> None:
    # the SDK's HTTP client, torn down at interpreter exit after a failed connection, aborted
    # the process (SIGABRT) about every other time; six runs at once all exit 1
    closed = {
        "AUTOPAUSE_E2B_API_URL": f"http://127.0.0.1:{free_port()}",
        "AUTOPAUSE_E2B_API_KEY": E2B_KEY,
        "AUTOPAUSE_STARTUP_PATIENCE": "1",
    }
    runs = await asyncio.gather(*(cli(settings, "run", "worker", **closed) for _ in range(6)))
    assert [done.returncode for done in runs] == [1] * 6, [done.stderr[-300:] for done in runs]
    assert all("check AUTOPAUSE_E2B_API_URL" in done.stderr for done in runs)

"""Fixtures on the real services, and the layers.

A test's layer is its directory: ``unit``, ``integration``, ``fault``, ``abuse``
or ``cluster``; each gets the marker of that name, so ``-m unit`` and
``tests/unit`` select the same tests. Each test that may use the shared
RabbitMQ and PostgreSQL gets its own Postgres schema and broker names, and
holds the services lock (shared; alone for a test marked ``outage``; not at all
for a test marked ``isolated``, which uses only the emulator or private nodes).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aio_pika
import asyncpg
import pytest
from pydantic import SecretStr

from consumer.broker import declare_topology, delete_topology
from consumer.settings import Settings, load_settings
from consumer.store import Store
from e2b_emulator import Emulator

from .helpers.config import AMQP_URL, DATABASE_URL, E2B_KEY
from .helpers.exclusive import refuse_connections, services_lock, shared_addresses
from .helpers.processes import Launcher, Spawn

LAYERS = ("unit", "integration", "fault", "abuse", "cluster")
TESTS = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test with its layer, order them for the workers, deselect ``docker`` unless asked for."""
    for item in items:
        parts = item.path.resolve().relative_to(TESTS).parts
        if len(parts) < 2 or parts[0] not in LAYERS:
            raise pytest.UsageError(f"{item.nodeid}: a test lives in one of tests/{{{','.join(LAYERS)}}}/")
        item.add_marker(parts[0])
    # the tests that hold the services alone first, then the longest one: nothing waits on them later
    items.sort(
        key=lambda item: 0 if item.get_closest_marker("outage") else 1 if "cluster" in item.keywords else 2
    )
    if "docker" not in (config.getoption("markexpr") or ""):
        docker = [item for item in items if item.get_closest_marker("docker")]
        if docker:
            config.hook.pytest_deselected(items=docker)
            items[:] = [item for item in items if not item.get_closest_marker("docker")]


def _order(item: pytest.Item) -> int:
    if item.get_closest_marker("cluster"):
        return 0
    return 2 if item.get_closest_marker("outage") else 1


@pytest.fixture(autouse=True)
def _services(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Hold the services lock around every test beyond the unit layer that uses them."""
    if request.node.get_closest_marker("unit"):
        yield
        return
    if request.node.get_closest_marker("isolated"):
        why = "a test marked isolated uses no shared service"
        refuse_connections(monkeypatch, why, only=shared_addresses())
        yield
        return
    with services_lock(alone=request.node.get_closest_marker("outage") is not None):
        yield


@pytest.fixture
def names_seed() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture
async def settings(names_seed: str) -> AsyncIterator[Settings]:
    """Settings with a private schema and topology; both are removed afterwards."""
    made = load_settings(
        amqp_url=AMQP_URL,
        database_url=DATABASE_URL,
        database_schema=f"t_{names_seed}",
        topology_prefix=f"t{names_seed}.",
        metrics_port=0,
        flush_interval=0.05,
        default_idle_timeout=600,
    )
    yield made
    conn = await asyncpg.connect(DATABASE_URL)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{made.database_schema}" CASCADE')
    finally:
        await conn.close()
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        await delete_topology(await connection.channel(), made.topology_prefix)


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[Store]:
    made = await Store.connect(settings.database_url.get_secret_value(), settings.database_schema)
    await made.migrate()
    yield made
    await made.close()


@pytest.fixture
async def channel(settings: Settings) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        ch = await connection.channel(publisher_confirms=True)
        await declare_topology(ch, settings)
        yield ch


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    """Start autopause subprocesses (``spawn(args, env, name)``), output to a log file each.

    Any still running at the end are killed.
    """
    launcher = Launcher(tmp_path)
    yield launcher
    launcher.close()


@pytest.fixture
async def emulator() -> AsyncIterator[Emulator]:
    """The E2B emulator, accepting only E2B_KEY."""
    async with Emulator(api_key=E2B_KEY, seed=1) as emu:
        yield emu


@pytest.fixture
def pause_settings(settings: Settings, emulator: Emulator) -> Settings:
    """Settings whose worker pauses through ``emulator``, with short retry delays."""
    return settings.model_copy(
        update={
            "e2b_api_url": emulator.url,
            "e2b_api_key": SecretStr(E2B_KEY),
            "retry_base_delay": 0.01,
            "retry_max_delay": 0.05,
            "e2b_request_timeout": 5.0,
            "claim_max_share": 1.0,
        }
    )


# a two-second idle timeout and a tick every second: what the tests of live roles wait for
TICKING_IDLE_TIMEOUT = 2.0


@pytest.fixture
def ticking_settings(pause_settings: Settings) -> Settings:
    """``pause_settings`` with a two-second idle timeout and a scheduler tick every second."""
    return pause_settings.model_copy(
        update={"default_idle_timeout": TICKING_IDLE_TIMEOUT, "tick_cron": "* * * * * *"}
    )

"""The roles run in this process on a test's settings: seed sandboxes, ingest, tick, work."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from functools import partial
from typing import Any

from consumer import runner
from consumer.settings import Settings
from consumer.store import Store
from e2b_emulator import Emulator

from .amqp import publish_fresh
from .database import arrived_long_ago, ingest_caught_up, ticks
from .events import ago, event
from .waiting import wait_for


@contextlib.asynccontextmanager
async def service(settings: Settings, roles: set[str]) -> AsyncIterator[asyncio.Task[int]]:
    """``roles`` running in this process inside the block; stopped as by SIGTERM afterwards."""
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(settings, roles, stop=stop), name="service-" + "+".join(roles))
    try:
        yield task
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, timeout=60)


async def ingest(settings: Settings) -> None:
    """Ingest every queued event, then stop (burst)."""
    assert await runner.run(settings, {"ingest"}, burst=True) == 0


async def work(settings: Settings) -> None:
    """Take every queued pause command, then stop (burst)."""
    assert await runner.run(settings, {"worker"}, burst=True) == 0


async def tick(settings: Settings) -> None:
    """One scheduler tick."""
    assert await runner.run(settings, {"scheduler"}, once=True) == 0


@contextlib.asynccontextmanager
async def ingest_running(settings: Settings) -> AsyncIterator[asyncio.Task[int]]:
    """An ingest replica running and caught up inside the block: the scheduler may claim."""
    async with service(settings, {"ingest"}) as task:
        await wait_for(lambda: ingest_caught_up(settings), what="ingest caught up")
        yield task


async def tick_with_ingest(settings: Settings) -> None:
    """One scheduler tick, with an ingest replica running and caught up, as in a deployment."""
    async with ingest_running(settings):
        await tick(settings)


async def seed(
    settings: Settings, emulator: Emulator, *, idle: Sequence[str] = (), active: Sequence[str] = ()
) -> None:
    """Sandboxes in the emulator and their events ingested: idle ones an hour quiet, active ones fresh."""
    bodies: list[dict[str, Any] | bytes] = []
    for sid in idle:
        emulator.add_sandbox(sid)
        bodies.append(event("created", sid, at=ago(3600)))
    for sid in active:
        emulator.add_sandbox(sid)
        bodies += [event("created", sid, at=ago(3600)), event("activity", sid)]
    await publish_fresh(settings, bodies)
    await ingest(settings)
    await arrived_long_ago(settings)


async def each_tick(store: Store, seconds: float, act: Callable[[], Awaitable[object]]) -> None:
    """Do ``act`` once per scheduler tick, for at least ``seconds`` and four ticks."""
    started = time.monotonic()
    seen = 0
    while time.monotonic() - started < seconds or seen < 4:
        await act()
        await wait_for(partial(_more_ticks, store, len(await ticks(store))), timeout=10, what="the next tick")
        seen += 1


async def _more_ticks(store: Store, than: int) -> bool:
    return len(await ticks(store)) > than

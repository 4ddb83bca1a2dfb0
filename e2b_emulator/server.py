"""The Emulator: one aiohttp server with the E2B API and the control API, and its Python face."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime
from types import TracebackType
from typing import Self

from aiohttp import web

from e2b_emulator import control, model
from e2b_emulator.api import Api
from e2b_emulator.calls import Call, CallLog
from e2b_emulator.faults import Faults
from e2b_emulator.fleet import Fleet
from e2b_emulator.model import (
    DEFAULT_CPU_COUNT,
    DEFAULT_DISK_MB,
    DEFAULT_MEMORY_MB,
    DEFAULT_TIMEOUT,
    STATES,
    Box,
    Sandbox,
    Sizes,
)

logger = logging.getLogger(__name__)


def _utc_now() -> datetime:
    return datetime.now(UTC)


class Emulator:
    """The E2B API on loopback, with sandbox states, faults and a call log."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        faults: Faults | None = None,
        auto_create: bool = False,
        seed: int | None = None,
        *,
        api_key: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        """``api_key``: the only key accepted (default: any). ``clock``: arrival times
        in the call log. ``wall_clock``: sandbox times (start, end, samples)."""
        self.faults = faults if faults is not None else Faults()
        self._host, self._port = host, port
        self._now = wall_clock
        self._fleet = Fleet(random.Random(seed), auto_create=auto_create)
        self._log = CallLog()
        self._stopping = asyncio.Event()
        self._api = Api(
            self._fleet,
            faults=lambda: self.faults,
            log=self._log,
            rng=random.Random(seed),
            clock=clock,
            wall_clock=wall_clock,
            api_key=api_key,
            stopping=self._stopping,
        )
        self._runner: web.AppRunner | None = None
        self._url = ""

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> str:
        """Bind and serve; return the base URL, e.g. ``http://127.0.0.1:41234``."""
        if self._runner is not None:
            return self._url
        self._stopping.clear()
        app = web.Application()
        app.add_routes(self._api.routes())
        app.add_routes(control.routes(self))
        # Cancelling a handler whose client went away frees hung calls at once.
        runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, self._host, self._port, backlog=4096)
        await site.start()
        host, port = runner.addresses[0][:2]
        self._runner = runner
        self._url = f"http://{host}:{port}"
        return self._url

    async def stop(self) -> None:
        """Release hung calls, close every connection and unbind."""
        if self._runner is None:
            return
        self._stopping.set()
        runner, self._runner = self._runner, None
        await runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def url(self) -> str:
        if not self._url:
            raise RuntimeError("the emulator has not been started")
        return self._url

    # -- sandboxes, from outside the API ----------------------------------------

    def add_sandbox(
        self,
        sandbox_id: str,
        *,
        state: str = "running",
        template: str = "base",
        metadata: dict[str, str] | None = None,
        cpu_count: int = DEFAULT_CPU_COUNT,
        memory_mb: int = DEFAULT_MEMORY_MB,
        disk_size_mb: int = DEFAULT_DISK_MB,
        cpu_used_pct: float = 0.0,
        mem_used_mb: int | None = None,
        disk_used_mb: int | None = None,
        timeout: int = DEFAULT_TIMEOUT,
    ) -> Sandbox:
        """Make ``sandbox_id`` exist in ``state`` (replacing any earlier one of that id),
        ending ``timeout`` seconds from now; ValueError on a bad value, and nothing changes."""
        if state not in STATES:
            raise ValueError(f"state must be one of {STATES}")
        sizes = Sizes(cpu_count, memory_mb, disk_size_mb, cpu_used_pct, mem_used_mb, disk_used_mb)
        now = self._now()
        box = self._fleet.add(
            sandbox_id, now, template=template, metadata=dict(metadata or {}), timeout=timeout, sizes=sizes
        )
        if state == "paused":
            model.pause(box, now)
        logger.debug("sandbox added", extra={"action": "emulator.added", "sandbox_id": sandbox_id})
        return model.snapshot(box, now)

    def state_of(self, sandbox_id: str) -> str | None:
        """``"running"``, ``"paused"``, or None for an unknown or killed sandbox."""
        box = self._fleet.get(sandbox_id)
        return box.state if box else None

    def sandbox(self, sandbox_id: str) -> Sandbox | None:
        """An immutable snapshot of the sandbox, or None for an unknown or killed one."""
        box = self._fleet.get(sandbox_id)
        return model.snapshot(box, self._now()) if box else None

    def set_cpu(self, sandbox_id: str, cpu_used_pct: float, *, sample_age: float | None = None) -> Sandbox:
        """Set the CPU its metrics samples show. With ``sample_age`` (s), its latest
        sample is pinned that old until the next set_cpu or resume; without, samples
        are fresh again. LookupError for an unknown sandbox, ValueError for bad values."""
        box = self._known(sandbox_id)
        now = self._now()
        model.set_cpu(box, now, cpu_used_pct, sample_age)
        return model.snapshot(box, now)

    def pause_outside(self, sandbox_id: str) -> Sandbox:
        """Pause it as E2B itself would (``on_timeout``): no API call, nothing in calls().
        A paused sandbox stays as it is. LookupError for an unknown sandbox."""
        box = self._known(sandbox_id)
        now = self._now()
        if box.state == "running":
            model.pause(box, now)
            self._outside("paused", sandbox_id)
        return model.snapshot(box, now)

    def resume_outside(self, sandbox_id: str, timeout: int = DEFAULT_TIMEOUT) -> Sandbox:
        """Resume it as auto-resume or an app's connect() would, with connect's end-time
        rule; no API call, nothing in calls(). LookupError for an unknown sandbox."""
        box = self._known(sandbox_id)
        now = self._now()
        if model.run(box, now, model.check_timeout(timeout)):
            self._outside("resumed", sandbox_id)
        return model.snapshot(box, now)

    def kill_outside(self, sandbox_id: str) -> None:
        """Kill it as E2B's ``on_timeout`` or an app would: no API call, nothing in calls().
        LookupError for an unknown sandbox."""
        self._fleet.kill(self._known(sandbox_id))
        self._outside("killed", sandbox_id)

    def _known(self, sandbox_id: str) -> Box:
        box = self._fleet.get(sandbox_id)
        if box is None:
            raise LookupError(f"no sandbox {sandbox_id}")
        return box

    def _outside(self, change: str, sandbox_id: str) -> None:
        logger.info(
            f"sandbox {change} outside the API",
            extra={"action": f"emulator.{change}_outside", "sandbox_id": sandbox_id},
        )

    # -- the call log ----------------------------------------------------------

    def calls(self, op: str | None = None, sandbox_id: str | None = None) -> list[Call]:
        """The recorded calls in the order they were answered, filtered by op and sandbox."""
        return self._log.select(op, sandbox_id)

    def peak_rate(self, op: str | None = None, window: float = 1.0) -> int:
        """The most calls (of ``op``) that arrived within any half-open ``window`` seconds."""
        return self._log.peak_rate(op, window)

    def reset_calls(self) -> None:
        self._log.clear()

    def reset(self, *, faults: bool = False, sandboxes: bool = False) -> None:
        """Forget the calls; also turn every fault off, and forget every sandbox, if asked."""
        self._log.clear()
        if faults:
            self.faults.update(Faults().to_json())
        if sandboxes:
            self._fleet.clear()
        logger.info(
            "emulator reset",
            extra={"action": "emulator.reset", "faults": faults, "sandboxes": sandboxes},
        )


async def serve(host: str, port: int, faults: Faults, auto_create: bool) -> None:
    """Run an emulator until cancelled (the ``autopause emulator`` command)."""
    emulator = Emulator(host, port, faults=faults, auto_create=auto_create)
    url = await emulator.start()
    logger.info(
        "emulator listening",
        extra={"action": "emulator.listening", "url": url, "auto_create": auto_create},
    )
    try:
        await asyncio.Event().wait()
    finally:
        await emulator.stop()

"""Liveness, readiness and metrics over HTTP: /healthz, /readyz and /metrics.

Readiness is a set of named flags (``database``, ``broker``, ``consuming``...)
that the roles and a probe loop keep current; liveness is a heartbeat per loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from consumer.errors import AutopauseError

log = logging.getLogger(__name__)

Probe = Callable[[], Awaitable[bool]]


class Health:
    """The process's view of itself, read by the HTTP endpoints and by ``status``."""

    def __init__(self, stale_after: float = 60.0) -> None:
        self.flags: dict[str, bool] = {}
        self.beats: dict[str, float] = {}
        self.stale_after = stale_after

    def set(self, name: str, ok: bool) -> None:
        self.flags[name] = ok

    def beat(self, loop: str) -> None:
        self.beats[loop] = time.monotonic()

    def ready(self) -> bool:
        return bool(self.flags) and all(self.flags.values())

    def alive(self) -> bool:
        now = time.monotonic()
        return all(now - at < self.stale_after for at in self.beats.values())

    def report(self) -> dict[str, object]:
        now = time.monotonic()
        return {
            "ready": self.ready(),
            "alive": self.alive(),
            "checks": dict(self.flags),
            "loops": {name: round(now - at, 1) for name, at in self.beats.items()},
        }


async def probe_forever(health: Health, probes: dict[str, Probe], every: float = 2.0) -> None:
    """Refresh a readiness flag per probe, forever. Failure policy: a failing probe marks unready."""
    while True:
        for name, probe in probes.items():
            try:
                ok = await asyncio.wait_for(probe(), timeout=every * 2)
            except (AutopauseError, OSError, TimeoutError):
                ok = False
            health.set(name, ok)
        health.beat("probe")
        await asyncio.sleep(every)


async def serve(health: Health, host: str, port: int) -> web.AppRunner:
    """Start the HTTP server; the caller cleans the returned runner up."""

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response(health.report(), status=200 if health.alive() else 503)

    async def readyz(_: web.Request) -> web.Response:
        return web.json_response(health.report(), status=200 if health.ready() else 503)

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    log.info("health and metrics served", extra={"action": "health.serve", "port": port})
    return runner

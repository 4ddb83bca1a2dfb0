"""Simulated users of an app builder: their sandboxes get busy, go idle, and come back.

Used by ``autopause generate`` (a producer for a test or compose deployment) and
by the demo, which also checks the service against the truth kept here: when
each sandbox was really used.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import pairwise

import orjson
from aio_pika.abc import AbstractExchange

from consumer.broker import message

log = logging.getLogger(__name__)

SOURCES = ("terminal", "file", "preview", "agent", "api")
Resume = Callable[[str], Awaitable[object]]


@dataclass
class SimUser:
    """One user with one sandbox, and the truth of its use (monotonic times)."""

    sandbox_id: str
    project_id: str
    user_id: str
    wanders_off: bool  # takes breaks longer than the idle timeout
    activity: list[float] = field(default_factory=list)

    def idle_spans(self, end: float) -> list[tuple[float, float]]:
        """(start, end) of the gaps between uses, the last one running to ``end``."""
        times = [*self.activity, end]
        return [(a, b) for a, b in pairwise(times) if b > a]


@dataclass
class Plan:
    """How users behave, in seconds, relative to the service's idle timeout."""

    idle_timeout: float
    busy_for: tuple[float, float] = (2.0, 5.0)
    beat: tuple[float, float] = (0.4, 1.2)

    def short_break(self, rng: random.Random) -> float:
        return rng.uniform(0.15, 0.45) * self.idle_timeout

    def long_break(self, rng: random.Random) -> float:
        return rng.uniform(1.8, 2.4) * self.idle_timeout + 2


def event_body(
    kind: str, sandbox_id: str, *, project_id: str, user_id: str, source: str = "terminal"
) -> dict[str, object]:
    """A ``sandbox.<kind>`` event happening now, as an app service publishes it."""
    body: dict[str, object] = {
        "event_id": str(uuid.uuid4()),
        "type": f"sandbox.{kind}",
        "occurred_at": datetime.now(UTC).isoformat(),
        "sandbox_id": sandbox_id,
    }
    if kind == "created":
        body.update(project_id=project_id, user_id=user_id, template="base")
    elif kind == "activity":
        body["source"] = source
    return body


def event(kind: str, user: SimUser, rng: random.Random) -> tuple[str, bytes]:
    body = event_body(
        kind, user.sandbox_id, project_id=user.project_id, user_id=user.user_id, source=rng.choice(SOURCES)
    )
    return f"sandbox.{kind}", orjson.dumps(body)


class Traffic:
    """Publishes the events of ``users`` simulated users until ``stop`` is set."""

    def __init__(
        self,
        exchange: AbstractExchange,
        users: int,
        plan: Plan,
        *,
        idle_share: float = 0.5,
        seed: int | None = None,
        resume: Resume | None = None,
    ) -> None:
        self.exchange = exchange
        self.plan = plan
        self.rng = random.Random(seed)
        self.resume = resume
        run = uuid.uuid4().hex[:6]
        self.users = [
            SimUser(
                sandbox_id=f"sbx-{run}-{i:04d}",
                project_id=f"project-{i % max(1, users // 3)}",
                user_id=f"user-{i}",
                wanders_off=self.rng.random() < idle_share,
            )
            for i in range(users)
        ]
        self.published = 0

    async def _send(self, kind: str, user: SimUser) -> None:
        routing_key, body = event(kind, user, self.rng)
        await self.exchange.publish(message(body), routing_key=routing_key)
        self.published += 1
        if kind != "killed":
            user.activity.append(time.monotonic())

    async def _live(self, user: SimUser, stop: asyncio.Event) -> None:
        await self._send("created", user)
        rng = random.Random(self.rng.random())
        while not stop.is_set():
            busy_until = time.monotonic() + rng.uniform(*self.plan.busy_for)
            while time.monotonic() < busy_until and not stop.is_set():
                await _nap(stop, rng.uniform(*self.plan.beat))
                if not stop.is_set():
                    await self._send("activity", user)
            long = user.wanders_off and rng.random() < 0.8
            await _nap(stop, self.plan.long_break(rng) if long else self.plan.short_break(rng))
            if stop.is_set():
                break
            if long and self.resume is not None:
                await self.resume(user.sandbox_id)  # the app connects, which resumes a paused sandbox
            await self._send("activity", user)

    async def run(self, stop: asyncio.Event) -> None:
        """Run every user until ``stop``; a user's failure stops only that user (logged)."""
        tasks = [asyncio.create_task(self._live(u, stop), name=f"user-{u.user_id}") for u in self.users]
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for user, result in zip(self.users, results, strict=True):
            if isinstance(result, BaseException):
                log.error(
                    "simulated user failed",
                    extra={
                        "action": "traffic.user_failed",
                        "user": user.user_id,
                        "error": repr(result),
                    },
                )


async def _nap(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)

"""A recorded traffic trace, drawn ahead of time from the demo's users, and its replay against deployments.

The users are those of :mod:`consumer.traffic` (the demo and ``autopause
generate``), with its :class:`~consumer.traffic.Plan` for the service's idle
timeout: each works in bursts of ``busy_for`` seconds with an activity every
``beat``, and between bursts takes a short break (0.15 to 0.45 of the idle
timeout) or, for the share that wanders off, mostly (4 in 5) a long one
(about twice the idle timeout), after which the app connects (which resumes
a paused sandbox) before its first activity. :func:`generate` applies the
same rules with one seeded random generator, in trace seconds, so every run
replays the same events; users arrive over the first ``ARRIVALS_S`` seconds
instead of all at once.

:func:`replay` publishes the trace's events to several deployments at once,
each at its time divided by the compression, stamped with that time; it adds
each sandbox to the deployment's emulator when it is created and resumes it
there (as the app's ``connect()`` would) when its user comes back from a long
break and finds it paused.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from benchmarks.data import body
from benchmarks.pipeline import Deployment
from consumer.traffic import Plan

ARRIVALS_S = 300.0
IDLE_SHARE = 0.5  # the share of users who wander off (``autopause generate``'s default)
LONG_BREAK_ODDS = 0.8  # how often a user who wanders off takes a long break


@dataclass(frozen=True, slots=True)
class Use:
    """One event of the trace: its time (trace seconds), sandbox and kind."""

    at: float
    sandbox_id: str
    kind: str  # "created" or "activity"
    returning: bool = False  # the first activity after a long break: the app connects first


@dataclass(frozen=True)
class Trace:
    """Every sandbox's events over ``seconds``, for a service whose idle timeout is ``idle_timeout``."""

    seconds: float
    idle_timeout: float
    uses: dict[str, list[Use]]  # per sandbox, in time order; the first is its creation

    def events(self) -> list[Use]:
        """All events in time order."""
        return sorted((u for uses in self.uses.values() for u in uses), key=lambda u: (u.at, u.sandbox_id))

    def times(self, sandbox_id: str) -> list[float]:
        return [u.at for u in self.uses[sandbox_id]]

    @property
    def activities(self) -> int:
        return sum(u.kind == "activity" for uses in self.uses.values() for u in uses)


def _user(sid: str, rng: random.Random, plan: Plan, wanders: bool, seconds: float) -> list[Use]:
    """One user's events, by the rules of :meth:`consumer.traffic.Traffic._live`."""
    t = rng.uniform(0, ARRIVALS_S)
    uses = [Use(t, sid, "created")]
    while True:
        busy_until = t + rng.uniform(*plan.busy_for)
        while t < busy_until:
            t += rng.uniform(*plan.beat)
            if t >= seconds:
                return uses
            uses.append(Use(t, sid, "activity"))
        long = wanders and rng.random() < LONG_BREAK_ODDS
        t += plan.long_break(rng) if long else plan.short_break(rng)
        if t >= seconds:
            return uses
        uses.append(Use(t, sid, "activity", returning=long))


def generate(users: int, seconds: float, *, idle_timeout: float = 600.0, seed: int = 20261201) -> Trace:
    """The trace of ``users`` users over ``seconds`` (trace time); the same for the same arguments."""
    plan = Plan(idle_timeout)
    rng = random.Random(seed)
    wanders = [rng.random() < IDLE_SHARE for _ in range(users)]
    uses = {}
    for i in range(users):
        sid = f"trace-{i:05d}"
        uses[sid] = _user(sid, random.Random(rng.random()), plan, wanders[i], seconds)
    return Trace(seconds, idle_timeout, uses)


@dataclass
class Replayed:
    """What a replay did: when it started, how late it ran, the app's resumes."""

    started: float  # time.monotonic() at the start
    wall: float  # time.time() at the start: the trace's events are stamped wall + at / compression
    compression: float
    lag_max_s: float = 0.0  # the most a publish ran behind its time, in real seconds
    resumes: list[list[tuple[str, float]]] = field(
        default_factory=list
    )  # per deployment: (sandbox, monotonic)

    def trace_time(self, monotonic: float) -> float:
        """A time.monotonic() reading of the run, in trace seconds."""
        return (monotonic - self.started) * self.compression


async def replay(trace: Trace, compression: float, deployments: list[Deployment]) -> Replayed:
    """Publish ``trace`` to each deployment, every event at its compressed time; return at the trace's end."""
    events = trace.events()
    started, wall = time.monotonic(), time.time()
    done = Replayed(started, wall, compression, resumes=[[] for _ in deployments])
    for use in events:
        delay = started + use.at / compression - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            done.lag_max_s = max(done.lag_max_s, -delay)
        stamp = datetime.fromtimestamp(wall + use.at / compression, UTC)
        data = body(use.kind, use.sandbox_id, stamp)
        for deployment, resumes in zip(deployments, done.resumes, strict=True):
            emulator = deployment.emulator
            if use.kind == "created":
                emulator.add_sandbox(use.sandbox_id)
            elif use.returning and emulator.state_of(use.sandbox_id) == "paused":
                emulator.resume_outside(use.sandbox_id)
                resumes.append((use.sandbox_id, time.monotonic()))
            await deployment.publish(f"sandbox.{use.kind}", data)
    await asyncio.sleep(max(0.0, started + trace.seconds / compression - time.monotonic()))
    return done

"""Memory: the resident size of each role's process over a sustained run at a steady event rate.

A deployment (:mod:`benchmarks.pipeline`): ingest, scheduler and worker, each
in its own process at default settings except the idle timeout, the worker
pausing through the e2b SDK against the emulator. Events arrive at
``memory_rate`` per second (in slices of 100 ms) for ``memory_seconds``, so
that every role works all along:

* a window of sandboxes (``PER_SANDBOX`` events per sandbox per second)
  slides over a pool three times its size; a sandbox stays in it for
  ``ACTIVE_S`` seconds, then is left idle for twice as long;
* an idle sandbox falls due after the idle timeout (``IDLE_S``, shorter in
  short runs): the scheduler claims it and the worker pauses it, about
  ``memory_rate / PER_SANDBOX / ACTIVE_S`` pauses per second;
* when the window comes round again (every ``3 * ACTIVE_S`` seconds, well
  within the first minute), the app resumes the sandbox (in the emulator, as
  its ``connect()`` would) and its events bring the row back to RUNNING; a
  worker checks with E2B that it runs.

Events are published without confirms: on two cores, shared with the roles
and RabbitMQ, a confirming aio-pika publisher tops out below 2,000/s (about
290 us of CPU per message against 180 without); the run checks that the last
event was committed. VmRSS of each process is read from /proc every second.
The figures per role are the RSS at the end of the first minute, when every
path (create, pause, resume) has run, and at the end of the run, and the
growth between them: a leak shows as growth that keeps rising with the run's
length.
"""

from __future__ import annotations

import asyncio
import random
import time
from datetime import UTC, datetime
from pathlib import Path

from benchmarks.common import Context, Figure, wait_for
from benchmarks.data import body, committed
from benchmarks.pipeline import ROLES, Deployment, deployed
from benchmarks.processes import CpuMeter, cores_note

BENCH = "memory"
SLICE = 0.1
ACTIVE_S = 15.0
PER_SANDBOX = 2.0
IDLE_S = 10.0


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class RollingLoad:
    """Events at a steady rate over a sliding window of sandboxes (see the module docstring)."""

    def __init__(self, deployment: Deployment, rate: float) -> None:
        self.deployment = deployment
        self.rate = rate
        self.window = max(1, int(rate / PER_SANDBOX))
        self.pool = 3 * self.window
        self.speed = self.window / ACTIVE_S  # sandboxes leaving (and entering) the window per second
        self.rng = random.Random(7)
        self.seen: set[int] = set()
        self.published = 0
        self.resumed = 0
        self.behind_s = 0.0  # the most events that were due at once, in seconds of the rate
        self.last: tuple[str, datetime] | None = None

    @staticmethod
    def sandbox(i: int) -> str:
        return f"mem-{i:06d}"

    def add_pool(self) -> None:
        """Every sandbox of the pool exists in E2B from the start, running."""
        for i in range(self.pool):
            self.deployment.emulator.add_sandbox(self.sandbox(i))

    def _next(self, elapsed: float) -> tuple[str, bytes]:
        start = int(self.speed * elapsed)
        i = (start + self.rng.randrange(self.window)) % self.pool
        sid = self.sandbox(i)
        emulator = self.deployment.emulator
        if emulator.state_of(sid) == "paused":
            emulator.resume_outside(sid)  # the app's connect(), before it uses the sandbox
            self.resumed += 1
        kind = "activity" if i in self.seen else "created"
        self.seen.add(i)
        at = datetime.now(UTC)
        self.published += 1
        self.last = (sid, at)
        return f"sandbox.{kind}", body(kind, sid, at)

    async def run(self, seconds: float) -> float:
        """Publish on schedule for ``seconds``, catching up when behind; return the elapsed time."""
        started = time.monotonic()
        while (elapsed := time.monotonic() - started) < seconds:
            due = min(int(self.rate * elapsed) - self.published, int(self.rate))
            if due > 0:
                self.behind_s = max(self.behind_s, due / self.rate)
                for _ in range(due):
                    await self.deployment.publish(*self._next(elapsed))
            await asyncio.sleep(SLICE)
        return time.monotonic() - started


def at_or_after(samples: list[tuple[float, float]], moment: float) -> float:
    for t, rss in samples:
        if t >= moment:
            return rss
    return samples[-1][1]


async def sample(deployment: Deployment, task: asyncio.Task[float]) -> dict[str, list[tuple[float, float]]]:
    """VmRSS of each role every second until ``task`` is done."""
    started = time.monotonic()
    samples: dict[str, list[tuple[float, float]]] = {role: [] for role in ROLES}
    while not task.done():
        deployment.check()
        for role, proc in deployment.procs.items():
            if (rss := rss_mib(proc.pid)) is not None:
                samples[role].append((time.monotonic() - started, rss))
        await asyncio.wait({task}, timeout=1.0)
    return samples


async def run(ctx: Context) -> list[Figure]:
    seconds, rate = ctx.sizes.memory_seconds, ctx.sizes.memory_rate
    minute = min(60.0, seconds / 3)
    idle = min(IDLE_S, seconds / 4)
    async with deployed(ctx, "memory", default_idle_timeout=idle) as d:
        load = RollingLoad(d, rate)
        load.add_pool()
        at_start = {role: rss_mib(proc.pid) or 0.0 for role, proc in d.procs.items()}
        meter = CpuMeter(**{role: proc.pid for role, proc in d.procs.items()}).start()
        task = asyncio.create_task(load.run(seconds), name="rolling-load")
        try:
            samples = await sample(d, task)
        finally:
            if not task.done():
                task.cancel()
        elapsed = await task
        cores = meter.stop()
        assert load.last is not None
        sid, at = load.last

        async def caught_up() -> bool:
            d.check()
            return await committed(d.conn, sid, at)

        await wait_for(caught_up, timeout=120, what="ingest to catch up", interval=0.1)
        pauses, resumes = await d.transitions("paused"), await d.transitions("resumed")
    achieved = load.published / elapsed
    ctx.details[BENCH] = {
        "rate": rate,
        "seconds": seconds,
        "idle_timeout_s": idle,
        "window": load.window,
        "pool": load.pool,
        "published": load.published,
        "achieved_rate": achieved,
        "publisher_behind_max_s": load.behind_s,
        "pauses": pauses,
        "resumes": resumes,
        "resumed_by_app": load.resumed,
        "rss_at_start_mib": at_start,
        "samples": {role: [(round(t, 1), round(r, 1)) for t, r in s] for role, s in samples.items()},
        "cores": cores,
    }
    ctx.say(
        f"   published {load.published:,} events at {achieved:,.0f}/s; {pauses:,} pauses, {resumes:,} resumes"
    )
    span = f"{minute:g} s"
    figures = [
        Figure(
            BENCH,
            "sustained load: events published",
            achieved,
            "events/s",
            note=f"{load.published:,} events (asked {rate:,.0f}/s) over {elapsed:.0f} s; {pauses:,} pauses"
            f" ({pauses / elapsed:.1f}/s), {resumes:,} resumes; idle timeout {idle:g} s; "
            + cores_note(cores),
        )
    ]
    for role in ROLES:
        series = samples[role]
        first, last = at_or_after(series, minute), series[-1][1]
        peak = max(rss for _, rss in series)
        figures += [
            Figure(
                BENCH,
                f"{role} RSS at end ({seconds:g} s)",
                last,
                "MiB",
                note=f"at start {at_start[role]:.1f} MiB, at {span} {first:.1f} MiB, peak {peak:.1f} MiB",
            ),
            Figure(
                BENCH,
                f"{role} RSS growth, {span} -> end",
                last - first,
                "MiB",
                note=f"{(last - first) / max(seconds - minute, 1) * 60:.2f} MiB per minute",
            ),
        ]
    return figures

"""Memory: the resident size of an ingest process over a sustained run at a steady event rate.

``autopause run ingest`` in its own process; events arrive at ``memory_rate``
per second (in slices of 100 ms) for ``memory_seconds``, over a rotating pool
of sandboxes. They are published without confirms: on two cores, shared with
ingest and RabbitMQ, a confirming aio-pika publisher tops out below 2,000/s
(about 290 us of CPU per message against 180 without); the run still checks
that the last event was committed. VmRSS is read from
/proc every second. The figures are the RSS at the end of the first minute
and at the end of the run, and the growth between them: a leak shows as
growth that keeps rising with the run's length.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import aio_pika
from aio_pika.abc import AbstractExchange

from benchmarks.common import Context, Figure, amqp, connected, consuming, depth, isolated, wait_for
from benchmarks.data import body, committed, messages
from benchmarks.processes import CpuMeter, child_env, cores_note, python
from consumer.broker import Names

BENCH = "memory"
SLICE = 0.1
POOL = 20_000


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class SteadyPublisher:
    """Events at a steady rate; remembers the last one, to wait for its commit."""

    def __init__(self, exchange: AbstractExchange, rate: float) -> None:
        self.exchange = exchange
        self.rate = rate
        self.tag = uuid.uuid4().hex[:6]
        self.published = 0
        self.behind_s = 0.0  # the most events that were due at once, in seconds of the rate
        self.last: tuple[str, datetime] | None = None

    def _next(self) -> tuple[str, bytes]:
        n = self.published
        sid = f"mem-{self.tag}-{n % POOL:05d}"
        at = datetime.now(UTC)
        kind = "created" if n < POOL else "activity"
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
                for key, msg in messages(self._next() for _ in range(due)):
                    await self.exchange.publish(msg, routing_key=key)
            await asyncio.sleep(SLICE)
        return time.monotonic() - started


def at_or_after(samples: list[tuple[float, float]], moment: float) -> float:
    for t, rss in samples:
        if t >= moment:
            return rss
    return samples[-1][1]


async def run(ctx: Context) -> list[Figure]:
    seconds, rate = ctx.sizes.memory_seconds, ctx.sizes.memory_rate
    minute = min(60.0, seconds / 3)
    async with (
        isolated(ctx.base, "memory") as settings,
        connected(settings) as (conn, channel),
        await aio_pika.connect(amqp(settings)) as publishing,
    ):
        names = Names(settings.topology_prefix)
        proc = ctx.procs.start("ingest", python("-m", "consumer", "run", "ingest"), child_env(settings))
        try:
            await consuming(channel, names.events_queue)
            at_start = rss_mib(proc.pid)
            unconfirmed = await publishing.channel(publisher_confirms=False)
            publisher = SteadyPublisher(await unconfirmed.get_exchange(names.events_exchange), rate)
            meter = CpuMeter(ingest=proc.pid).start()
            task = asyncio.create_task(publisher.run(seconds), name="steady-publisher")
            started = time.monotonic()
            samples: list[tuple[float, float]] = []
            while not task.done():
                ctx.procs.check(proc)
                if (rss := rss_mib(proc.pid)) is not None:
                    samples.append((time.monotonic() - started, rss))
                await asyncio.wait({task}, timeout=1.0)
            elapsed = await task
            cores = meter.stop()
            assert publisher.last is not None
            sid, at = publisher.last

            async def caught_up() -> bool:
                return await committed(conn, sid, at)

            await wait_for(caught_up, timeout=120, what="ingest to catch up", interval=0.1)
            backlog, _ = await depth(channel, names.events_queue)
            if (rss := rss_mib(proc.pid)) is not None:
                samples.append((time.monotonic() - started, rss))
        finally:
            await ctx.procs.stop(proc)
    first = at_or_after(samples, minute)
    last = samples[-1][1]
    peak = max(rss for _, rss in samples)
    ctx.details[BENCH] = {
        "rate": rate,
        "seconds": seconds,
        "published": publisher.published,
        "achieved_rate": publisher.published / elapsed,
        "publisher_behind_max_s": publisher.behind_s,
        "rss_at_start_mib": at_start,
        "samples": [(round(t, 1), round(r, 1)) for t, r in samples],
        "backlog_at_end": backlog,
        "cores": cores,
    }
    achieved = publisher.published / elapsed
    ctx.say(
        f"   published {publisher.published:,} events at {achieved:,.0f}/s; RSS {first:.1f} -> {last:.1f} MiB"
    )
    span = f"{minute:g} s"
    run_note = (
        f"{publisher.published:,} events at {achieved:,.0f}/s (asked {rate:,.0f}/s) over {elapsed:.0f} s"
    )
    run_note += f"; RSS at start {at_start or 0:.1f} MiB; " + cores_note(cores)
    return [
        Figure(BENCH, f"ingest RSS at {span}", first, "MiB", note=run_note),
        Figure(BENCH, f"ingest RSS at end ({seconds:g} s)", last, "MiB", note=f"peak {peak:.1f} MiB"),
        Figure(
            BENCH,
            f"RSS growth, {span} -> end",
            last - first,
            "MiB",
            note=f"{(last - first) / max(seconds - minute, 1) * 60:.2f} MiB per minute",
        ),
    ]

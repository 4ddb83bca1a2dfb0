"""Ingest throughput: events into committed rows, against two baselines, on a large table.

Five measurements, each on its own schema and queues, with the same events:

* raw: a process that only consumes and batch-acks (the broker's ceiling),
  through aio-pika's ``queue.consume``, and again on the aiormq channel under
  it (``basic_consume``), the path ingest takes;
* naive: a process that upserts one row and acks one message at a time;
* ingest: ``autopause run ingest`` in its own process.

For these the queue is filled first, then the clock runs from the first
delivery (the queue's ready count drops) to the last ack (raw, naive) or to
the commit of the last event (ingest: its sandbox row shows that event's
time; ingest writes batches in queue order, so every earlier one is in). The
last, end to end, starts the clock at the first publish while ingest is
already consuming, and stops it at the same last commit. Naive and ingest work
on a table seeded with ``sessions`` rows; every measurement checks that all
events landed.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import orjson
from aio_pika.abc import AbstractChannel

from benchmarks import profiles
from benchmarks.common import (
    Context,
    Figure,
    at_least,
    connected,
    consuming,
    depth,
    first_delivery,
    isolated,
    wait_for,
)
from benchmarks.data import (
    Stream,
    all_committed,
    committed,
    messages,
    mixed_stream,
    publish_pipelined,
    seed_sessions,
)
from benchmarks.processes import CpuMeter, child_env, cores_note, cpu_note, entry, per_event, python
from consumer.broker import Names
from consumer.settings import Settings

BENCH = "ingest"
RAW = ("raw", "raw-aiormq")


def stream_for(ctx: Context) -> Stream:
    sizes = ctx.sizes
    return mixed_stream(sizes.events, seeded=sizes.sessions, sandboxes=max(2, sizes.events // 5))


def ingest_command(profile: Path | None = None, *, burst: bool = False) -> list[str]:
    return python(*entry("consumer", profile), "run", "ingest", *(["--burst"] if burst else []))


async def until_committed(conn: asyncpg.Connection, stream: Stream, timeout: float) -> float:
    """time.time() when the stream's last event is committed; then check that every one is."""
    sid, at = stream.marker

    async def landed() -> float:
        return time.time() if await committed(conn, sid, at) else 0.0

    done = await wait_for(landed, timeout=timeout, what="the last event's commit", interval=0.01)
    got = await all_committed(conn, stream.expected)
    if got != len(stream.expected):
        raise RuntimeError(f"only {got} of {len(stream.expected)} sandboxes show their last event")
    return done


class Bench:
    """One isolated measurement: its settings, a broker channel and a database connection."""

    def __init__(self, ctx: Context, settings: Settings, channel: AbstractChannel, conn: asyncpg.Connection):
        self.ctx = ctx
        self.settings = settings
        self.channel = channel
        self.conn = conn
        self.queue = Names(settings.topology_prefix).events_queue

    async def seed(self) -> float:
        seconds = await seed_sessions(self.conn, self.ctx.sizes.sessions)
        self.ctx.say(f"   seeded {self.ctx.sizes.sessions:,} sessions in {seconds:.1f} s")
        return seconds

    async def publish(self, stream: Stream) -> tuple[float, float]:
        exchange = await self.channel.get_exchange(Names(self.settings.topology_prefix).events_exchange)
        return await publish_pipelined(exchange, messages(stream.items))

    async def prefill(self, stream: Stream) -> float:
        """Publish the whole stream into the idle queue; events/s of the publish."""
        first, last = await self.publish(stream)
        ready, _ = await depth(self.channel, self.queue)
        if ready != len(stream.items):
            raise RuntimeError(f"{ready} of {len(stream.items)} events queued")
        return len(stream.items) / (last - first)


@contextlib.asynccontextmanager
async def bench(ctx: Context, label: str) -> AsyncIterator[Bench]:
    async with isolated(ctx.base, label) as settings, connected(settings) as (conn, channel):
        yield Bench(ctx, settings, channel, conn)


async def baseline(ctx: Context, kind: str, profile: Path | None = None) -> dict[str, Any]:
    """raw or naive, on a pre-filled queue (optionally under cProfile)."""
    async with bench(ctx, "ingest_" + kind.replace("-", "_")) as b:
        seed_s = await b.seed() if kind == "naive" else None
        stream = stream_for(ctx)
        count = len(stream.items)
        publish_rate = await b.prefill(stream)
        out = ctx.procs.logdir / f"{kind}-{time.time_ns()}.json"
        linger = "0" if profile else "60"
        args = python(
            *entry("baselines", profile), kind, "--count", str(count), "--out", str(out), "--linger", linger
        )
        proc = ctx.procs.start(f"baseline-{kind}", args, child_env(b.settings))
        meter = CpuMeter(subject=proc.pid).start()

        async def finished() -> bool:
            if not profile:
                ctx.procs.check(proc)
            return out.exists()

        try:
            start = await first_delivery(b.channel, b.queue, count, check=lambda: ctx.procs.check(proc))
            await wait_for(finished, timeout=900, what=f"the {kind} baseline", interval=0.02)
            cores = meter.stop()
            if profile:
                await ctx.procs.wait(proc, timeout=120)
        finally:
            await ctx.procs.stop(proc)
        if kind == "naive":
            got = await all_committed(b.conn, stream.expected)
            if got != len(stream.expected):
                raise RuntimeError(f"naive: only {got} of {len(stream.expected)} sandboxes landed")
        report = orjson.loads(out.read_bytes())
        seconds = report["last"] - start
        return {
            "rate": count / seconds,
            "seconds": seconds,
            "cpu_us_per_event": per_event(cores, seconds, count),
            "own_first_delivery_after_s": report["first"] - start,
            "publish_rate": publish_rate,
            "seed_s": seed_s,
            "cores": cores,
        }


async def prepublished(ctx: Context, profile: Path | None = None) -> dict[str, Any]:
    """autopause ingest on a pre-filled queue (optionally under cProfile, in burst mode)."""
    async with bench(ctx, "ingest_pre") as b:
        seed_s = await b.seed()
        stream = stream_for(ctx)
        publish_rate = await b.prefill(stream)
        proc = ctx.procs.start("ingest", ingest_command(profile, burst=bool(profile)), child_env(b.settings))
        meter = CpuMeter(subject=proc.pid).start()
        try:
            start = await first_delivery(
                b.channel, b.queue, len(stream.items), check=lambda: ctx.procs.check(proc)
            )
            done = await until_committed(b.conn, stream, timeout=900)
            cores = meter.stop()
            if profile:
                await ctx.procs.wait(proc, timeout=120)
        finally:
            await ctx.procs.stop(proc)
        return {
            "rate": len(stream.items) / (done - start),
            "seconds": done - start,
            "cpu_us_per_event": per_event(cores, done - start, len(stream.items)),
            "publish_rate": publish_rate,
            "seed_s": seed_s,
            "cores": cores,
        }


async def end_to_end(ctx: Context) -> dict[str, Any]:
    """Publish while ingest consumes: first publish to last commit."""
    async with bench(ctx, "ingest_e2e") as b:
        seed_s = await b.seed()
        stream = stream_for(ctx)
        proc = ctx.procs.start("ingest", ingest_command(), child_env(b.settings))
        try:
            await consuming(b.channel, b.queue)
            meter = CpuMeter(subject=proc.pid).start()
            first, confirmed = await b.publish(stream)
            done = await until_committed(b.conn, stream, timeout=900)
            cores = meter.stop()
        finally:
            await ctx.procs.stop(proc)
        n = len(stream.items)
        return {
            "rate": n / (done - first),
            "seconds": done - first,
            "cpu_us_per_event": per_event(cores, done - first, n),
            "publish_rate": n / (confirmed - first),
            "commit_after_last_confirm_s": done - confirmed,
            "seed_s": seed_s,
            "cores": cores,
        }


async def run(ctx: Context) -> list[Figure]:
    sizes = ctx.sizes
    ctx.say(
        f"   {sizes.events:,} events over {max(2, sizes.events // 5):,} sandboxes, "
        f"{sizes.sessions:,} sessions seeded"
    )
    results: dict[str, dict[str, Any]] = {}
    for kind in (*RAW, "naive"):
        results[kind] = await baseline(ctx, kind)
        ctx.say(f"   {kind}: {results[kind]['rate']:,.0f}/s ({cores_note(results[kind]['cores'])})")
    results["ingest"] = await prepublished(ctx)
    ctx.say(f"   ingest: {results['ingest']['rate']:,.0f}/s ({cores_note(results['ingest']['cores'])})")
    results["e2e"] = await end_to_end(ctx)
    ctx.say(f"   end to end: {results['e2e']['rate']:,.0f}/s ({cores_note(results['e2e']['cores'])})")
    if ctx.profile:
        for kind in (*RAW, "ingest"):
            path = ctx.procs.logdir / f"{kind}.prof"
            measured = await (baseline(ctx, kind, path) if kind in RAW else prepublished(ctx, path))
            summary = profiles.summarize(path)
            results[f"profile_{kind}"] = {"rate_under_profile": measured["rate"], **summary}
            title = f"{kind}, pre-published ({measured['rate']:,.0f}/s under cProfile)"
            ctx.say(profiles.render(title, summary))
    ctx.details[BENCH] = results
    return figures(results, sizes)


def figures(r: dict[str, dict[str, Any]], sizes: Any) -> list[Figure]:
    seeds = [v["seed_s"] for v in r.values() if v.get("seed_s")]
    raw, low, naive = r["raw"]["rate"], r["raw-aiormq"]["rate"], r["naive"]["rate"]
    ing, e2e = r["ingest"]["rate"], r["e2e"]["rate"]
    vs_raw, vs_low, vs_naive = ing / raw, ing / low, ing / naive
    publish = [r[k]["publish_rate"] for k in (*RAW, "naive", "ingest")]
    return [
        Figure(
            BENCH,
            f"seed {sizes.sessions:,} sessions (generate_series)",
            sum(seeds) / len(seeds),
            "s",
            note=f"mean of {len(seeds)} seeds, indexes rebuilt, VACUUM ANALYZE included",
        ),
        Figure(
            BENCH,
            "publish with confirms, pipelined",
            sum(publish) / len(publish),
            "events/s",
            note="mean of the four pre-fills",
        ),
        Figure(BENCH, "raw aio-pika consume + batch ack", raw, "msg/s", note=cpu_note(r["raw"])),
        Figure(
            BENCH,
            "raw aiormq channel consume + batch ack",
            low,
            "msg/s",
            note="the channel under aio-pika, the path ingest consumes through; " + cpu_note(r["raw-aiormq"]),
        ),
        Figure(
            BENCH,
            "naive: 1 upsert + 1 ack per message",
            naive,
            "events/s",
            note=cpu_note(r["naive"]),
        ),
        Figure(BENCH, "autopause ingest (pre-published)", ing, "events/s", note=cpu_note(r["ingest"])),
        Figure(BENCH, "ingest / raw aio-pika", vs_raw, "ratio", *at_least(vs_raw, 0.9)),
        Figure(
            BENCH,
            "ingest / raw aiormq (same consume path)",
            vs_low,
            "ratio",
            *at_least(vs_low, 0.9),
            note="what ingest adds per event, against the cheapest plain consumer",
        ),
        Figure(BENCH, "ingest / naive", vs_naive, "ratio", *at_least(vs_naive, 3)),
        Figure(
            BENCH,
            "end to end: first publish -> last commit",
            e2e,
            "events/s",
            note=f"publish {r['e2e']['publish_rate']:,.0f}/s; last commit "
            f"{r['e2e']['commit_after_last_confirm_s']:.2f} s after last confirm; " + cpu_note(r["e2e"]),
        ),
    ]

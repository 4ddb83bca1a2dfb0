"""Pause fan-out: how close the worker comes to the SDK alone, at the same concurrency.

The E2B emulator runs in its own process with 100 ms of latency per call.
For each concurrency, a fresh schema gets ``pause_count`` claimed rows and
their queued commands, as a tick leaves them (with the end of life a recent
listing gave, as reconcile records it); then ``autopause run worker --burst``
drains the queue in its own process, its CPU check on. The clock runs from the
first delivery to the last row PAUSED (the latest paused_at). Beside it, the
same number of pauses through the SDK alone at the same concurrency (the
target: the worker at 0.9 of it or better), the ideal min(concurrency /
latency, the worker's rate limit), and, for c=64, profiles of both.
"""

from __future__ import annotations

import socket
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
from aio_pika.abc import AbstractChannel
from pydantic import SecretStr

from benchmarks import profiles
from benchmarks.common import Context, Figure, at_least, connected, depth, first_delivery, isolated, wait_for
from benchmarks.data import messages, publish_pipelined
from benchmarks.processes import CpuMeter, child_env, cores_note, entry, python
from consumer.broker import PAUSE_ROUTING_KEY, Names
from consumer.settings import Settings

BENCH = "pause fan-out"
KEY = "e2b_bench_key"
PROFILED = 64
UNLIMITED = 100_000.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class Emulator:
    url: str
    pid: int


async def start_emulator(ctx: Context) -> Emulator:
    port = free_port()
    latency = str(ctx.sizes.latency)
    args = python("-m", "consumer", "emulator", "--port", str(port), "--latency", latency, "--auto-create")
    proc = ctx.procs.start("emulator", args, child_env(ctx.base))
    url = f"http://127.0.0.1:{port}"

    async def up() -> bool:
        ctx.procs.check(proc)
        try:
            async with aiohttp.ClientSession() as http, http.get(f"{url}/_emulator/faults") as answer:
                return answer.status == 200
        except aiohttp.ClientError:
            return False

    await wait_for(up, timeout=30, what="the emulator", interval=0.1)
    return Emulator(url, proc.pid)


async def pause_calls(url: str, prefix: str) -> dict[int, int]:
    """Status -> count of the pause calls the emulator answered for ids starting with ``prefix``."""
    async with aiohttp.ClientSession() as http, http.get(f"{url}/_emulator/calls?op=pause") as answer:
        calls = await answer.json()
    statuses: dict[int, int] = {}
    for call in calls:
        if str(call.get("sandbox_id") or "").startswith(prefix):
            statuses[call["status"]] = statuses.get(call["status"], 0) + 1
    return statuses


PAUSED = "SELECT count(*) FROM sandbox_sessions WHERE state = 'PAUSED'"
LAST_PAUSED = "SELECT extract(epoch FROM max(paused_at)) FROM sandbox_sessions"


async def claim_all(
    settings: Settings, conn: asyncpg.Connection, channel: AbstractChannel, prefix: str, count: int
) -> int:
    """``count`` claimed rows and their queued commands, as a tick leaves them; how many are queued.

    The rows carry the end of life a recent listing gave (as reconcile records
    it), so a pause costs one E2B call, as through the SDK alone.
    """
    ids = [f"{prefix}-{i:06d}" for i in range(count)]
    await conn.execute(
        """INSERT INTO sandbox_sessions (sandbox_id, state, last_activity, last_arrived_at, pause_due_at,
               generation, claimed_activity, claimed_at, e2b_end_at, e2b_seen_at)
           SELECT id, 'PAUSING', now() - interval '1 hour', now() - interval '1 hour', now(), 1,
                  now() - interval '1 hour', now(), now() + interval '1 hour', now()
           FROM unnest($1::text[]) AS id""",
        ids,
    )
    issued = datetime.now(UTC).isoformat()
    exchange = await channel.get_exchange(Names(settings.topology_prefix).commands_exchange)
    commands = (
        orjson.dumps(
            {"command_id": str(uuid.uuid4()), "sandbox_id": sid, "generation": 1, "issued_at": issued}
        )
        for sid in ids
    )
    await publish_pipelined(exchange, messages((PAUSE_ROUTING_KEY, body) for body in commands))
    queued, _ = await depth(channel, Names(settings.topology_prefix).pause_queue)
    return queued


async def through_worker(
    ctx: Context, emu: Emulator, concurrency: int, profile: Path | None = None
) -> dict[str, Any]:
    """Pause ``pause_count`` claimed rows with ``autopause run worker --burst``."""
    n = ctx.sizes.pause_count
    overrides: dict[str, Any] = {
        "claim_max_share": 1.0,
        "claim_hard_cap": n,
        "e2b_api_url": emu.url,
        "e2b_api_key": SecretStr(KEY),
        "worker_concurrency": concurrency,
    }
    prefix = f"c{concurrency}-{uuid.uuid4().hex[:6]}"
    async with (
        isolated(ctx.base, f"fanout_c{concurrency}", **overrides) as settings,
        connected(settings) as (conn, channel),
    ):
        queued = await claim_all(settings, conn, channel, prefix, n)
        if queued != n:
            raise RuntimeError(f"the tick queued {queued} of {n} pause commands")
        # no rate limit below what the SDK alone meets: the comparison is of the worker's own cost
        env = child_env(
            settings,
            worker_concurrency=concurrency,
            e2b_api_url=emu.url,
            e2b_api_key=KEY,
            e2b_rate_limit=UNLIMITED,
        )
        args = python(*entry("consumer", profile), "run", "worker", "--burst")
        proc = ctx.procs.start(f"worker-c{concurrency}", args, env)
        meter = CpuMeter(worker=proc.pid, emulator=emu.pid).start()

        async def all_paused() -> bool:
            ctx.procs.check(proc)
            return bool(await conn.fetchval(PAUSED) == n)

        try:
            queue = Names(settings.topology_prefix).pause_queue
            start = await first_delivery(channel, queue, n, check=lambda: ctx.procs.check(proc))
            await wait_for(all_paused, timeout=60 + n / concurrency, what="every row PAUSED", interval=0.05)
            cores = meter.stop()
            await ctx.procs.wait(proc, timeout=60)
        finally:
            await ctx.procs.stop(proc)
        end = float(await conn.fetchval(LAST_PAUSED))
    statuses = await pause_calls(emu.url, prefix)
    if statuses != {204: n}:
        raise RuntimeError(f"expected {n} pause calls answered 204, the emulator saw {statuses}")
    return {"rate": n / (end - start), "seconds": end - start, "cores": cores}


async def sdk_alone(
    ctx: Context, emu: Emulator, concurrency: int, profile: Path | None = None
) -> dict[str, Any]:
    n = ctx.sizes.pause_count
    out = ctx.procs.logdir / f"sdk-{concurrency}-{time.time_ns()}.json"
    options = {
        "--url": emu.url,
        "--count": str(n),
        "--concurrency": str(concurrency),
        "--prefix": f"sdk{concurrency}-{uuid.uuid4().hex[:6]}",
        "--out": str(out),
        "--linger": "0" if profile else "60",
    }
    args = python(*entry("baselines", profile), "sdk", *(part for pair in options.items() for part in pair))
    proc = ctx.procs.start(f"sdk-c{concurrency}", args, child_env(ctx.base))
    meter = CpuMeter(sdk=proc.pid, emulator=emu.pid).start()
    try:

        async def finished() -> bool:
            if not profile:
                ctx.procs.check(proc)
            return out.exists()

        await wait_for(finished, timeout=120 + 10 * n / concurrency, what="the SDK run", interval=0.02)
        cores = meter.stop()
        if profile:
            await ctx.procs.wait(proc, timeout=60)
    finally:
        await ctx.procs.stop(proc)
    result = orjson.loads(out.read_bytes())
    if result["outcomes"] != {"paused": n}:
        raise RuntimeError(f"SDK run: {result['outcomes']}")
    return {"rate": n / (result["last"] - result["first"]), "cores": cores}


async def run(ctx: Context) -> list[Figure]:
    sizes = ctx.sizes
    emu = await start_emulator(ctx)
    ctx.say(
        f"   {sizes.pause_count:,} pauses per run, emulator latency {sizes.latency * 1000:.0f} ms, "
        "no rate limit (the default one, 600/s, would bound c=64 and c=256 in both)"
    )
    results: dict[str, Any] = {"latency": sizes.latency, "runs": {}}
    figures: list[Figure] = []
    for c in sizes.concurrency:
        worker = await through_worker(ctx, emu, c)
        sdk = await sdk_alone(ctx, emu, c)
        ideal = c / sizes.latency
        ratio = worker["rate"] / sdk["rate"]
        results["runs"][str(c)] = {"worker": worker, "sdk": sdk, "ideal": ideal}
        ctx.say(
            f"   c={c}: worker {worker['rate']:,.0f}/s, SDK alone {sdk['rate']:,.0f}/s, ideal {ideal:,.0f}/s"
        )
        figures += [
            Figure(
                BENCH,
                f"worker, c={c}",
                worker["rate"],
                "pauses/s",
                note=f"ideal {ideal:,.0f}/s = {c}/{sizes.latency:g} s; " + cores_note(worker["cores"]),
            ),
            Figure(BENCH, f"worker / SDK alone, c={c}", ratio, "ratio", *at_least(ratio, 0.9)),
            Figure(
                BENCH,
                f"SDK alone, c={c}",
                sdk["rate"],
                "pauses/s",
                note=f"ideal {ideal:,.0f}/s; " + cores_note(sdk["cores"]),
            ),
        ]
    if ctx.profile and PROFILED in sizes.concurrency:
        for name, work in (("worker", through_worker), ("sdk", sdk_alone)):
            path = ctx.procs.logdir / f"{name}-c{PROFILED}.prof"
            measured = await work(ctx, emu, PROFILED, path)
            summary = profiles.summarize(path)
            results[f"profile_{name}_c{PROFILED}"] = {"rate_under_profile": measured["rate"], **summary}
            ctx.say(
                profiles.render(f"{name} c={PROFILED} ({measured['rate']:,.0f}/s under cProfile)", summary)
            )
    ctx.details[BENCH] = results
    return figures

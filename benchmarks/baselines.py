"""Baselines, each run as its own process, to put autopause's figures in proportion.

    python -m benchmarks.baselines raw   --count N --out FILE
        consume N messages from the events queue and ack them in batches
        (multiple=True), with ingest's prefetch and batch size: nothing else.
    python -m benchmarks.baselines raw-aiormq --count N --out FILE
        the same on the aiormq channel under aio-pika, as ingest consumes.
    python -m benchmarks.baselines naive --count N --out FILE
        what a first version would do: per message, parse, one upsert
        statement (INSERT ... ON CONFLICT DO UPDATE), one ack.
    python -m benchmarks.baselines sdk --url URL --count N --concurrency C --out FILE
        AsyncSandbox.pause of N sandboxes, C at a time, through the e2b SDK alone.

Queue, schema and sizes come from the same ``AUTOPAUSE_*`` settings as the
service's. Each writes {"first": ..., "last": ..., "count": ...} (time.time()
of its first delivery or call and of its last ack, commit or answer) to FILE,
then stays alive ``--linger`` seconds for the suite to read its CPU time.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import orjson
from aio_pika.abc import AbstractIncomingMessage
from aiormq.abc import DeliveredMessage

from consumer.broker import Broker, Names
from consumer.ingest import Rejected, parse
from consumer.settings import Settings, load_settings

DEADLINE = 600.0

NAIVE_UPSERT = """
INSERT INTO sandbox_sessions AS s (
    sandbox_id, project_id, user_id, template, state, last_activity, pause_due_at, killed_at)
VALUES ($1, $3, $4, $5, CASE WHEN $2 = 'sandbox.killed' THEN 'KILLED' ELSE 'RUNNING' END,
        $6::timestamptz, $6::timestamptz + make_interval(secs => $7::float8),
        CASE WHEN $2 = 'sandbox.killed' THEN $6::timestamptz END)
ON CONFLICT (sandbox_id) DO UPDATE SET
    project_id = coalesce(s.project_id, EXCLUDED.project_id),
    user_id = coalesce(s.user_id, EXCLUDED.user_id),
    template = coalesce(s.template, EXCLUDED.template),
    last_activity = greatest(s.last_activity, EXCLUDED.last_activity),
    pause_due_at = greatest(s.pause_due_at, EXCLUDED.pause_due_at),
    state = CASE WHEN $2 = 'sandbox.killed' THEN 'KILLED'
                 WHEN s.state IN ('KILLED', 'EXPIRED') THEN s.state ELSE 'RUNNING' END,
    killed_at = coalesce(s.killed_at, EXCLUDED.killed_at),
    updated_at = now()
"""


Finish = Callable[[dict[str, Any]], Awaitable[None]]


def finisher(out: Path, linger: float) -> Finish:
    """Write the result, then stay alive ``linger`` seconds with every connection still open.

    The suite reads the CPU time of this process and of its Postgres backend
    meanwhile, then stops it.
    """

    async def finish(result: dict[str, Any]) -> None:
        await asyncio.to_thread(out.write_bytes, orjson.dumps(result))
        await asyncio.sleep(linger)

    return finish


async def raw(settings: Settings, count: int, finish: Finish, *, underlay: bool = False) -> None:
    """Consume and batch-ack ``count`` messages, the way ingest does, without parsing or writing.

    With ``underlay``, on the aiormq channel under aio-pika (``basic_consume``,
    no per-message wrapper), the path ingest consumes through; else through
    aio-pika's ``queue.consume``.
    """
    connection = (await Broker.connect(settings, "bench-raw")).connection
    done = asyncio.Event()
    seen = 0
    first = last = 0.0

    def counted() -> tuple[bool, bool]:
        """Count one delivery: (does it close a batch, is it the last)."""
        nonlocal seen, first
        if seen == 0:
            first = time.time()
        seen += 1
        return seen % settings.batch_size == 0 or seen == count, seen == count

    def finished() -> None:
        nonlocal last
        last = time.time()
        done.set()

    async def after(ack: Callable[[], Awaitable[None]]) -> None:
        batch_end, final = counted()
        if batch_end:
            await ack()
        if final:
            finished()

    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=settings.prefetch)
        name = Names(settings.topology_prefix).events_queue
        if underlay:
            lower = await channel.get_underlay_channel()

            async def on_delivery(msg: DeliveredMessage) -> None:
                await after(lambda: lower.basic_ack(msg.delivery_tag or 0, multiple=True))

            await lower.basic_consume(name, on_delivery)
        else:

            async def on_message(msg: AbstractIncomingMessage) -> None:
                await after(lambda: msg.ack(multiple=True))

            await (await channel.get_queue(name)).consume(on_message)
        await asyncio.wait_for(done.wait(), DEADLINE)
        await finish({"first": first, "last": last, "count": seen})


async def naive(settings: Settings, count: int, finish: Finish) -> None:
    """One upsert statement and one ack per message, in arrival order."""
    db = await asyncpg.connect(
        settings.database_url.get_secret_value(),
        server_settings={"search_path": settings.database_schema},
    )
    upsert = await db.prepare(NAIVE_UPSERT)
    skew = timedelta(seconds=settings.clock_skew)
    connection = (await Broker.connect(settings, "bench-naive")).connection
    seen = rejected = 0
    first = last = 0.0
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=settings.prefetch)
        queue = await channel.get_queue(Names(settings.topology_prefix).events_queue)
        async with asyncio.timeout(DEADLINE), queue.iterator() as messages:
            async for msg in messages:
                if seen == 0:
                    first = time.time()
                context = {"now": datetime.now(UTC), "clock_skew": skew}
                event = parse(msg.body, limit=settings.max_message_bytes, context=context)
                if isinstance(event, Rejected):
                    rejected += 1
                    await msg.reject(requeue=False)
                else:
                    await upsert.fetch(
                        event.sandbox_id,
                        event.type,
                        getattr(event, "project_id", None),
                        getattr(event, "user_id", None),
                        getattr(event, "template", None),
                        event.occurred_at,
                        settings.default_idle_timeout,
                    )
                    await msg.ack()
                seen += 1
                if seen == count:
                    last = time.time()
                    break
        await finish({"first": first, "last": last, "count": seen, "rejected": rejected})
    await db.close()


async def sdk(url: str, count: int, concurrency: int, prefix: str, finish: Finish) -> None:
    """Pause ``count`` sandboxes through AsyncSandbox.pause, ``concurrency`` calls in flight."""
    from e2b import AsyncSandbox

    opts: dict[str, Any] = {
        "api_key": "e2b_bench_key",
        "api_url": url,
        "request_timeout": 15.0,
        "retries": 0,
        "debug": False,
    }
    outcomes: Counter[str] = Counter()
    ids = iter(range(count))

    async def lane() -> None:
        for i in ids:
            try:
                paused = await AsyncSandbox.pause(f"{prefix}-{i:06d}", mode="full", **opts)
                outcomes["paused" if paused else "already_paused"] += 1
            except Exception as exc:
                outcomes[type(exc).__name__] += 1

    first = time.time()
    async with asyncio.timeout(DEADLINE):
        await asyncio.gather(*(lane() for _ in range(concurrency)))
    await finish({"first": first, "last": time.time(), "count": count, "outcomes": dict(outcomes)})


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.baselines")
    parser.add_argument("kind", choices=("raw", "raw-aiormq", "naive", "sdk"))
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--url", default="")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--prefix", default="sdk")
    parser.add_argument("--linger", type=float, default=0.0, help="seconds to stay alive afterwards")
    args = parser.parse_args()
    finish = finisher(args.out, args.linger)
    if args.kind == "sdk":
        asyncio.run(sdk(args.url, args.count, args.concurrency, args.prefix, finish))
    elif args.kind == "naive":
        asyncio.run(naive(load_settings(), args.count, finish))
    else:
        asyncio.run(raw(load_settings(), args.count, finish, underlay=args.kind == "raw-aiormq"))


if __name__ == "__main__":
    main()

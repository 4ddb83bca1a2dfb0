"""``python -m benchmarks``: the whole suite, side by side in one run, a table and a JSON file.

    python -m benchmarks                    # every benchmark at full size
    python -m benchmarks --quick            # small sizes: a smoke test
    python -m benchmarks --only ingest,tick --events 20000

Connections come from the usual AUTOPAUSE_AMQP_URL and AUTOPAUSE_DATABASE_URL.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib
import signal
import sys
import tempfile
import traceback
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks import report
from benchmarks.common import Context, Figure, Timer, wait_for
from benchmarks.processes import Procs
from consumer.settings import load_settings

BENCHMARKS = ("ingest", "fanout", "tick", "lateness", "memory", "reconcile", "alternatives")


@dataclass(frozen=True)
class Sizes:
    events: int = 50_000
    sessions: int = 1_000_000
    pause_count: int = 3_000
    concurrency: tuple[int, ...] = (16, 64, 256)
    latency: float = 0.1
    tick_sessions: int = 1_000_000
    tick_idle: int = 10_000
    lateness_sandboxes: int = 200
    lateness_timeout: float = 30.0
    lateness_spread: float = 60.0
    lateness_fleet: int = 10_000
    memory_seconds: float = 180.0
    memory_rate: float = 2_000.0
    reconcile_fleet: int = 10_000
    alternatives_sandboxes: int = 300
    alternatives_minutes: float = 60.0
    alternatives_compression: float = 20.0


QUICK = Sizes(
    events=2_000,
    sessions=20_000,
    pause_count=150,
    concurrency=(16, 64),
    tick_sessions=20_000,
    tick_idle=500,
    lateness_sandboxes=20,
    lateness_timeout=3.0,
    lateness_spread=10.0,
    lateness_fleet=1_000,
    memory_seconds=9.0,
    memory_rate=500.0,
    reconcile_fleet=1_000,
    alternatives_sandboxes=100,
    alternatives_minutes=15.0,
    alternatives_compression=30.0,
)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test (< 1 min)")
    parser.add_argument("--only", default="", help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    parser.add_argument("--out", type=Path, default=Path("bench-results/results.json"))
    parser.add_argument(
        "--profile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the cProfile runs too (default: yes, except with --quick)",
    )
    parser.add_argument("--logs", type=Path, help="where child process logs go (default: a temp dir)")
    parser.add_argument(
        "--retries", type=int, default=2, help="runs again of a benchmark that failed (default 2)"
    )
    for spec in dataclasses.fields(Sizes):
        flag = "--" + spec.name.replace("_", "-")
        kind = str if spec.name == "concurrency" else type(spec.default)
        parser.add_argument(flag, type=kind, default=None, help=f"default {spec.default}")
    return parser.parse_args(argv)


def sizes_from(args: argparse.Namespace) -> Sizes:
    sizes = QUICK if args.quick else Sizes()
    changes: dict[str, Any] = {}
    for spec in dataclasses.fields(Sizes):
        value = getattr(args, spec.name)
        if value is None:
            continue
        if spec.name == "concurrency":
            value = tuple(int(part) for part in value.split(","))
        changes[spec.name] = value
    return dataclasses.replace(sizes, **changes)


async def attempts(ctx: Context, name: str, retries: int) -> list[Figure] | str:
    """Run one benchmark; after a failure, wait for the servers and run it again, ``retries`` times.

    On a shared machine a server restarted by other work breaks a run; a bug
    fails every attempt. Returns the figures, or the last error.
    """
    module = importlib.import_module(f"benchmarks.{name}")
    error = ""
    for attempt in range(1, retries + 2):
        ctx.say(f"\n== {name} (load average {report.load()}){f', attempt {attempt}' if attempt > 1 else ''}")
        try:
            figures: list[Figure] = await module.run(ctx)
            ctx.details.setdefault("attempts", {})[name] = attempt
            for figure in figures if attempt > 1 else []:
                figure.note += f"{'; ' if figure.note else ''}attempt {attempt} (an earlier one failed)"
            return figures
        except Exception as exc:
            error = f"{type(exc).__name__}: {str(exc)[:500]}"
            traceback.print_exc()
        finally:
            await ctx.procs.stop_all()
        with contextlib.suppress(TimeoutError):
            await wait_for(lambda: report.servers_up(ctx.base), timeout=180, what="the servers", interval=2)
    return error


async def main(args: argparse.Namespace) -> int:
    chosen = [name.strip() for name in args.only.split(",") if name.strip()] or list(BENCHMARKS)
    unknown = set(chosen) - set(BENCHMARKS)
    if unknown:
        print(f"unknown benchmark(s): {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    base = load_settings(metrics_port=0, log_level="WARNING")
    sizes = sizes_from(args)
    logs = args.logs or Path(tempfile.mkdtemp(prefix="autopause-bench-"))
    procs = Procs(logs)
    profile = args.profile if args.profile is not None else not args.quick
    ctx = Context(base=base, sizes=sizes, procs=procs, profile=profile)
    started = datetime.now(UTC)
    info = await report.machine(base)
    print(f"autopause benchmarks, {started:%Y-%m-%d %H:%M} UTC")
    print(report.describe(info))
    print(f"child process logs: {logs}")
    figures: list[Figure] = []
    errors: dict[str, str] = {}
    total = Timer()
    try:
        for name in chosen:
            timer = Timer()
            result = await attempts(ctx, name, args.retries)
            if isinstance(result, str):
                errors[name] = result
            else:
                figures += result
            ctx.say(f"   {name} took {timer.elapsed:.0f} s")
    finally:
        await procs.stop_all()
    print(f"\nResults ({started:%Y-%m-%d}, {total.elapsed:.0f} s, load average at end {report.load()}):\n")
    print(report.table(figures))
    for title, text in ctx.tables:
        print(f"\n{title}\n\n{text}")
    for name, error in errors.items():
        print(f"\n{name} FAILED: {error}")
    options = {"benchmarks": chosen, "quick": args.quick, "sizes": dataclasses.asdict(sizes)}
    report.write_json(
        args.out,
        info=info,
        options=options,
        figures=figures,
        details=ctx.details,
        errors=errors,
        started=started,
    )
    print(f"\nwritten: {args.out}")
    return 1 if errors else 0


def entry() -> None:
    args = parse_args(sys.argv[1:])

    async def guarded() -> int:
        # SIGTERM unwinds like Ctrl-C, so every child process and schema is cleaned up
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await main(args)

    try:
        code = asyncio.run(guarded())
    except (KeyboardInterrupt, asyncio.CancelledError):
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    entry()

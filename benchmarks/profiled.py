"""Run an entry point under cProfile, with its imports done before the profiler starts.

    python -m benchmarks.profiled OUT consumer run worker --burst
    python -m benchmarks.profiled OUT baselines sdk --url ... --count ...

Import time is start-up cost, not the steady state a benchmark is about: the
modules each role loads lazily are imported first, then the profiler runs
the command, and its statistics go to OUT when the command ends.
"""

from __future__ import annotations

import cProfile
import importlib
import sys

ENTRIES = {"consumer": "consumer.cli", "baselines": "benchmarks.baselines"}
WARM = ("consumer.runner", "consumer.ingest", "consumer.scheduler", "consumer.worker", "e2b", "httpx")


def main() -> None:
    out, entry, *args = sys.argv[1:]
    for name in WARM:
        importlib.import_module(name)
    module = importlib.import_module(ENTRIES[entry])
    sys.argv = [entry, *args]
    profiler = cProfile.Profile()
    code: int | str | None = 0
    profiler.enable()
    try:
        module.main()
    except SystemExit as exc:
        code = exc.code
    finally:
        profiler.disable()
        profiler.dump_stats(out)
    sys.exit(code)


if __name__ == "__main__":
    main()

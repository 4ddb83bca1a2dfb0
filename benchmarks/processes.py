"""Child processes of the suite, and the CPU they (and the servers) use while a figure is measured."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, Timer, amqp, dsn, wait_for
from consumer.settings import Settings, env_name


def child_env(settings: Settings, **fields: Any) -> dict[str, str]:
    """The environment of an autopause child process: this run's schema and names, plus ``fields``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUTOPAUSE_", "E2B_"))}
    values: dict[str, Any] = {
        "amqp_url": amqp(settings),
        "database_url": dsn(settings),
        "database_schema": settings.database_schema,
        "topology_prefix": settings.topology_prefix,
        "metrics_port": 0,
        "log_level": "WARNING",
        "batch_size": settings.batch_size,
        "prefetch": settings.prefetch,
        "flush_interval": settings.flush_interval,
        **fields,
    }
    env.update({env_name(k): str(v).lower() if isinstance(v, bool) else str(v) for k, v in values.items()})
    env["PYTHONUNBUFFERED"] = "1"
    return env


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


class Procs:
    """Child processes of the suite; output goes to a log file each, and all are stopped at the end."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.running: dict[int, tuple[str, subprocess.Popen[bytes], Path]] = {}

    def start(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        self.logdir.mkdir(parents=True, exist_ok=True)
        log = self.logdir / f"{name}-{len(self.running)}-{uuid.uuid4().hex[:4]}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        self.running[proc.pid] = (name, proc, log)
        return proc

    def tail(self, proc: subprocess.Popen[bytes], lines: int = 20) -> str:
        entry = self.running.get(proc.pid)
        if entry is None or not entry[2].exists():
            return ""
        return "\n".join(entry[2].read_text(errors="replace").splitlines()[-lines:])

    async def wait(self, proc: subprocess.Popen[bytes], timeout: float) -> int:
        """Wait for the process to exit on its own; raise TimeoutError (and leave it running) if not."""

        async def exited() -> bool:
            return proc.poll() is not None

        await wait_for(exited, timeout=timeout, what=f"{self._name(proc)} to exit", interval=0.05)
        return int(proc.returncode)

    async def stop(self, proc: subprocess.Popen[bytes], grace: float = 20) -> int:
        """SIGTERM, then SIGKILL after ``grace`` seconds."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await self.wait(proc, grace)
            except TimeoutError:
                proc.kill()
                await self.wait(proc, 10)
        return int(proc.returncode)

    async def stop_all(self) -> None:
        for _, proc, _ in list(self.running.values()):
            with contextlib.suppress(Exception):
                await self.stop(proc, grace=5)

    def check(self, proc: subprocess.Popen[bytes]) -> None:
        """Raise if a process that should be running has died."""
        if proc.poll() is not None:
            raise RuntimeError(f"{self._name(proc)} exited with {proc.returncode}:\n{self.tail(proc)}")

    def _name(self, proc: subprocess.Popen[bytes]) -> str:
        entry = self.running.get(proc.pid)
        return entry[0] if entry else str(proc.pid)


_TICK = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / _TICK


def _pids_named(*names: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() in names:
                    found.append(int(entry.name))
    return found


def _machine() -> tuple[float, float]:
    """CPU seconds the whole machine has been busy, and stolen by the hypervisor (/proc/stat)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return 0.0, 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq) / _TICK, steal / _TICK


class CpuMeter:
    """CPU seconds used during an interval by the process under test, RabbitMQ, Postgres and the suite.

    On a 2-core machine this shows who took the cores: the "cores" figure of a
    group is its CPU seconds divided by the wall time. "others" is the rest of
    the machine's busy time (other work on a shared machine), "steal" the time
    the hypervisor gave the cores to someone else.
    """

    def __init__(self, **subjects: int) -> None:
        self.subjects = subjects
        self.before: dict[str, dict[int, float]] = {}
        self.machine_before = (0.0, 0.0)
        self.timer = Timer()

    def _groups(self) -> dict[str, list[int]]:
        groups = {name: [pid] for name, pid in self.subjects.items()}
        groups["rabbitmq"] = _pids_named("beam.smp")
        groups["postgres"] = _pids_named("postgres")
        groups["suite"] = [os.getpid()]
        return groups

    def _snapshot(self) -> dict[str, dict[int, float]]:
        snap: dict[str, dict[int, float]] = {}
        for name, pids in self._groups().items():
            snap[name] = {pid: cpu for pid in pids if (cpu := _cpu_seconds(pid)) is not None}
        return snap

    def start(self) -> CpuMeter:
        self.before = self._snapshot()
        self.machine_before = _machine()
        self.timer.restart()
        return self

    def stop(self) -> dict[str, float]:
        """Cores busy per group over the interval (CPU seconds / wall seconds)."""
        after = self._snapshot()
        busy, stolen = (now - then for now, then in zip(_machine(), self.machine_before, strict=True))
        wall = max(self.timer.elapsed, 1e-9)
        cores = {}
        for name, pids in after.items():
            used = sum(cpu - self.before.get(name, {}).get(pid, 0.0) for pid, cpu in pids.items())
            cores[name] = round(used / wall, 2)
        cores["others"] = round(max(0.0, busy / wall - sum(cores.values())), 2)
        cores["steal"] = round(stolen / wall, 2)
        return cores


def cores_note(cores: dict[str, float]) -> str:
    return "cores: " + ", ".join(f"{k} {v:.2f}" for k, v in cores.items())


def per_event(cores: dict[str, float], seconds: float, count: int) -> float:
    """Microseconds of CPU the process under test spent per event."""
    return cores["subject"] * seconds / count * 1e6


def cpu_note(result: dict[str, Any]) -> str:
    """The CPU cost per event of a result with ``cpu_us_per_event`` and ``cores``."""
    return f"{result['cpu_us_per_event']:.0f} us CPU/event in the consumer; " + cores_note(result["cores"])


def entry(module: str, profile: Path | None) -> list[str]:
    """Interpreter arguments that run ``module`` ("consumer" or "baselines"), under cProfile if asked."""
    if profile is not None:
        return ["-m", "benchmarks.profiled", str(profile), module]
    return ["-m", "consumer" if module == "consumer" else "benchmarks.baselines"]

"""autopause as a subprocess: one command run to its end, or a role that runs until stopped."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from consumer.settings import Settings

from .config import AMQP_URL, DATABASE_URL, E2B_KEY, ROOT


def free_port() -> int:
    """A loopback port nothing listens on (until someone binds it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def autopause(*args: str) -> list[str]:
    """The command line of ``autopause ARGS`` with this interpreter."""
    return [sys.executable, "-m", "consumer", *args]


def clean_env(**extra: str) -> dict[str, str]:
    """An environment with no AUTOPAUSE_* or E2B_* variable of the caller's, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUTOPAUSE_", "E2B_"))}
    env.update(extra)
    return env


def isolated_env(settings: Settings, **extra: str) -> dict[str, str]:
    """Environment for a subprocess that uses the same schema and broker names."""
    env = clean_env(
        AUTOPAUSE_AMQP_URL=AMQP_URL,
        AUTOPAUSE_DATABASE_URL=DATABASE_URL,
        AUTOPAUSE_DATABASE_SCHEMA=settings.database_schema,
        AUTOPAUSE_TOPOLOGY_PREFIX=settings.topology_prefix,
        AUTOPAUSE_METRICS_PORT="0",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def run_sync(
    args: list[str], env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run a command to its end, output captured as text."""
    return subprocess.run(
        args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )


def e2b_env(url: str) -> dict[str, str]:
    """The environment that sends a command's E2B calls to the emulator at ``url``, with its key."""
    return {"AUTOPAUSE_E2B_API_URL": url, "AUTOPAUSE_E2B_API_KEY": E2B_KEY}


async def run(
    args: list[str], env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run a command to its end in a thread, so the event loop (and what it serves) keeps going."""
    return await asyncio.to_thread(run_sync, args, env, timeout)


async def cli(settings: Settings, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``autopause ARGS`` as a subprocess on ``settings``' schema and broker names, to its end."""
    return await run(autopause(*args), isolated_env(settings, **env))


def terminal_safe(text: str) -> bool:
    """Nothing a terminal could act on: printable characters and line ends only."""
    return all(char.isprintable() or char == "\n" for char in text)


async def cli_ok(settings: Settings, *args: str, **env: str) -> str:
    """Run ``autopause ARGS`` like :func:`cli`; the test fails unless it exits 0. Its standard output."""
    done = await cli(settings, *args, **env)
    assert done.returncode == 0, f"autopause {' '.join(args)} exited {done.returncode}: {done.stderr[-2000:]}"
    return done.stdout


@dataclass
class Proc:
    """A long-running subprocess whose output goes to a file (a pipe would fill up and stall it)."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self, tail: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-tail:]

    async def wait(self, timeout: float) -> int:
        return await asyncio.to_thread(self.popen.wait, timeout)

    async def stop(self, timeout: float = 60) -> int:
        """SIGTERM, as a supervisor stops a process; its exit code."""
        self.popen.send_signal(signal.SIGTERM)
        return await self.wait(timeout)

    def kill(self) -> None:
        """SIGKILL, and wait for it to be gone."""
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(timeout=10)


Spawn = Callable[..., Proc]


class Launcher:
    """Starts subprocesses with a log file each; ``close`` kills any still running."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started: list[Proc] = []

    def __call__(self, args: list[str], env: dict[str, str], name: str = "process") -> Proc:
        log = self.logs / f"{name}-{len(self.started)}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(args, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        proc = Proc(name, popen, log)
        self.started.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.started:
            if proc.alive():
                proc.popen.kill()
            proc.popen.wait(timeout=10)

"""Private RabbitMQ nodes on loopback, for tests that restart, kill or cluster a broker.

Each node has its own name, ports, data and log directories under the test's
temporary directory, and runs as a child of the test (its own process group):
stopping it never touches the shared broker (rabbit@localhost) or epmd. The
nodes of one test share an Erlang cookie through their HOME.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .amqp import accepts_clients
from .processes import free_port

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")
START_TIMEOUT = 90.0


def _bin(name: str) -> str:
    path = RABBITMQ_BIN / name
    return str(path) if path.exists() else name


@dataclass
class PrivateNode:
    """One RabbitMQ node: ``start`` it, ``stop`` (gracefully) or ``kill`` it, ``start`` it again."""

    base: Path
    name: str
    config: str = ""
    plugins: tuple[str, ...] = ()
    amqp_port: int = field(default_factory=free_port)
    dist_port: int = field(default_factory=free_port)
    management_port: int = field(default_factory=free_port)
    prometheus_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def node(self) -> str:
        return f"{self.name}@localhost"

    @property
    def dir(self) -> Path:
        return self.base / self.name

    def url(self, user: str = "guest", password: str = "guest") -> str:
        return f"amqp://{user}:{password}@127.0.0.1:{self.amqp_port}/"

    def env(self) -> dict[str, str]:
        return {
            **{k: v for k, v in os.environ.items() if not k.startswith("RABBITMQ_")},
            "HOME": str(self.base),  # the .erlang.cookie the nodes and the CLI share
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(self.dir / "pid"),
            "RABBITMQ_LOGS": str(self.dir / "log" / "node.log"),
        }

    def _write_files(self) -> None:
        (self.dir / "log").mkdir(parents=True, exist_ok=True)
        cookie = self.base / ".erlang.cookie"
        if not cookie.exists():
            cookie.write_text(uuid.uuid4().hex.upper())
            cookie.chmod(0o400)
        lines = [
            f"management.tcp.port = {self.management_port}",
            "management.tcp.ip = 127.0.0.1",
            f"prometheus.tcp.port = {self.prometheus_port}",
            "prometheus.tcp.ip = 127.0.0.1",
        ]
        (self.dir / "rabbitmq.conf").write_text(self.config + "\n" + "\n".join(lines) + "\n")
        (self.dir / "enabled_plugins").write_text(f"[{','.join(self.plugins)}].\n")

    def start_process(self) -> None:
        """Start the node in the background (no wait)."""
        assert self.process is None or self.process.poll() is not None, f"{self.node} runs already"
        self._write_files()
        out = (self.dir / "log" / "stdout.log").open("ab")
        self.process = subprocess.Popen(
            [_bin("rabbitmq-server")],
            env=self.env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        out.close()

    async def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start the node and wait until a client can open a channel."""
        self.start_process()
        await self.wait_ready(timeout)

    async def wait_ready(self, timeout: float = START_TIMEOUT, url: str | None = None) -> None:
        """Wait until a client (guest, or the one of ``url``) can open a channel; fail if the node exits."""
        deadline = time.monotonic() + timeout
        while not await accepts_clients(url or self.url()):
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"{self.node} exited at start:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.node} did not start in {timeout}s:\n{self.log_tail()}")
            await asyncio.sleep(0.25)

    def ctl(self, *args: str, tool: str = "rabbitmqctl", timeout: float = 60) -> str:
        """Run a CLI tool against this node; fail the test when it fails."""
        done = subprocess.run(
            [_bin(tool), "-n", self.node, *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise AssertionError(f"{tool} {' '.join(args)} on {self.node}: {done.stderr or done.stdout}")
        return done.stdout

    async def actl(self, *args: str, tool: str = "rabbitmqctl", timeout: float = 60) -> str:
        return await asyncio.to_thread(self.ctl, *args, tool=tool, timeout=timeout)

    async def stop(self, timeout: float = 60) -> None:
        """Stop the node gracefully, and make sure its processes are gone."""
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(Exception):
            await self.actl("stop", timeout=timeout)
        await asyncio.to_thread(self._reap, timeout)

    def kill(self) -> None:
        """Kill the node's whole process group at once (a crash, not a shutdown)."""
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def _reap(self, timeout: float) -> None:
        assert self.process is not None
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=timeout)
        # the beam and its helpers (erl_child_setup, inet_gethost) share the session
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)

    def log_tail(self, lines: int = 40) -> str:
        found = []
        for path in sorted((self.dir / "log").glob("*.log")):
            found.append(
                f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
            )
        return "\n".join(found)


@contextlib.contextmanager
def private_nodes(base: Path, count: int = 1, **options: object) -> Iterator[list[PrivateNode]]:
    """``count`` nodes (not started); every one is killed at the end, whatever happened."""
    seed = uuid.uuid4().hex[:6]
    nodes = [PrivateNode(base, f"ap{seed}n{i + 1}", **options) for i in range(count)]  # type: ignore[arg-type]
    try:
        yield nodes
    finally:
        for node in nodes:
            node.kill()

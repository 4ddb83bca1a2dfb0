"""Beyond one broker: a three-node RabbitMQ cluster loses the events queue's leader under load.

Three private nodes on loopback are joined into one cluster; the autopause
topology is declared on it (its quorum queues get a member on every node);
ingest and worker processes run against the two nodes that will survive (the
service takes one AMQP URL, so a process connected to the node that dies could
not fail over by itself); then the node that leads the events queue is killed
while events are being published. Every confirmed event must be applied, every
idle sandbox paused exactly once, no busy one paused. Wall time and peak memory
(all nodes and processes together) are written to the test's output.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pytest

from consumer.broker import Names, declare_topology, message
from consumer.settings import Settings
from consumer.state import State
from consumer.store import Store
from e2b_emulator import Emulator

from ..helpers.amqp import publish_confirmed
from ..helpers.config import E2B_KEY
from ..helpers.events import event
from ..helpers.processes import Proc, Spawn, autopause, isolated_env
from ..helpers.rabbitmq_nodes import PrivateNode, private_nodes
from ..helpers.waiting import wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(900)]

IDLE_PER_WAVE = 250
BUSY = 80
ACTIVITY_PER_BUSY = 10


def rss_bytes(roots: set[int], sessions: set[int]) -> int:
    """Resident memory of the processes in ``sessions`` and of ``roots`` with their descendants."""
    parents: dict[int, int] = {}
    info: dict[int, tuple[int, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        pid = int(entry)
        parents[pid] = int(fields[1])
        rss = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
        info[pid] = (int(fields[3]), rss * 1024)
    total = 0
    for pid, (session, rss) in info.items():
        ancestor = pid
        while ancestor and ancestor not in roots:
            ancestor = parents.get(ancestor, 0)
        if session in sessions or ancestor in roots:
            total += rss
    return total


class Peak:
    """Samples the memory of a growing set of processes every half second."""

    def __init__(self) -> None:
        self.roots: set[int] = {os.getpid()}
        self.sessions: set[int] = set()
        self.peak = 0
        self.task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        while True:
            self.peak = max(self.peak, await asyncio.to_thread(rss_bytes, self.roots, self.sessions))
            await asyncio.sleep(0.5)


@contextlib.asynccontextmanager
async def sampling(peak: Peak) -> AsyncIterator[Peak]:
    peak.task = asyncio.create_task(peak.run(), name="memory-sampler")
    try:
        yield peak
    finally:
        peak.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await peak.task


async def form_cluster(nodes: list[PrivateNode]) -> None:
    for node in nodes:
        node.start_process()
    await asyncio.gather(*(node.wait_ready() for node in nodes))
    first = nodes[0]
    for node in nodes[1:]:
        await node.actl("stop_app")
        await node.actl("join_cluster", first.node)
        await node.actl("start_app")
        await node.wait_ready()
    status = json.loads(await first.actl("cluster_status", "--formatter", "json"))
    assert sorted(status["running_nodes"]) == sorted(node.node for node in nodes)


async def quorum_members(node: PrivateNode, queue: str) -> dict[str, str]:
    """node name -> raft state (leader, follower) of a quorum queue."""
    out = await node.actl("quorum_status", queue, "--formatter", "json", tool="rabbitmq-queues")
    return {row["Node Name"]: row["Raft State"] for row in json.loads(out)}


def created(sandbox: str, at: datetime, idle_timeout_s: int | None) -> dict[str, Any]:
    timeout = {} if idle_timeout_s is None else {"idle_timeout_s": idle_timeout_s}
    return event("created", sandbox, at=at, project_id="proj-cluster", user_id="user-cluster", **timeout)


class Publisher:
    """Publishes events with confirms to one node, retrying a batch until it is confirmed."""

    def __init__(self, url: str, exchange: str) -> None:
        self.url = url
        self.exchange_name = exchange
        self.confirmed: list[dict[str, Any]] = []
        self.retries = 0

    async def send(self, bodies: list[dict[str, Any]], batch: int = 200) -> None:
        connection = await aio_pika.connect_robust(self.url)
        try:
            for start in range(0, len(bodies), batch):
                chunk = bodies[start : start + batch]
                deadline = time.monotonic() + 120
                while True:
                    try:
                        channel = await connection.channel(publisher_confirms=True)
                        exchange = await channel.get_exchange(self.exchange_name, ensure=False)
                        await publish_confirmed(
                            exchange, ((body["type"], message(orjson.dumps(body))) for body in chunk)
                        )
                        await channel.close()
                        break
                    except Exception:
                        self.retries += 1
                        if time.monotonic() > deadline:
                            raise
                        await asyncio.sleep(0.2)
                self.confirmed.extend(chunk)
        finally:
            await connection.close()


def wave(idle: list[str], busy: list[str], hour_ago: datetime, *, first: bool) -> list[dict[str, Any]]:
    """Created events of sandboxes idle for an hour; the busy ones created (first wave) and in use."""
    bodies = [created(s, hour_ago, 30) for s in idle]
    if first:
        bodies += [created(s, datetime.now(UTC), None) for s in busy]
    for _ in range(ACTIVITY_PER_BUSY):
        bodies += [event("activity", s) for s in busy]
    return bodies


async def assert_nothing_lost_and_no_pause_twice(
    store: Store, emulator: Emulator, confirmed: list[dict[str, Any]], idle: list[str], busy: list[str]
) -> None:
    """Every confirmed event is applied; every idle sandbox paused once, no busy one at all."""
    for sandbox in idle:
        row = await store.get_session(sandbox)
        assert row is not None and row.state == "PAUSED", (sandbox, row)
    latest: dict[str, str] = {}
    for body in confirmed:
        if body["type"] == "sandbox.activity":
            latest[body["sandbox_id"]] = max(latest.get(body["sandbox_id"], ""), body["occurred_at"])
    for sandbox in busy:
        row = await store.get_session(sandbox)
        assert row is not None and row.state == "RUNNING", (sandbox, row)
        assert row.last_activity == datetime.fromisoformat(latest[sandbox])
    pauses = Counter(c.sandbox_id for c in emulator.calls("pause") if 200 <= c.status < 300)
    assert set(pauses) == set(idle)
    assert max(pauses.values()) == 1, [s for s, n in pauses.items() if n > 1]
    assert {emulator.state_of(s) for s in idle} == {"paused"}
    assert {emulator.state_of(s) for s in busy} == {"running"}


async def test_the_events_queue_leader_dies_under_load_and_nothing_is_lost(
    tmp_path: Path,
    settings: Settings,
    store: Store,
    spawn: Spawn,
) -> None:
    started = time.monotonic()
    names = Names(settings.topology_prefix)
    peak = Peak()
    with private_nodes(tmp_path / "rabbitmq", 3) as nodes:
        async with sampling(peak), Emulator(api_key=E2B_KEY, seed=7) as emulator:
            await form_cluster(nodes)
            peak.sessions |= {node.process.pid for node in nodes if node.process is not None}
            formed = time.monotonic() - started

            connection = await aio_pika.connect(nodes[0].url())
            async with connection:
                await declare_topology(await connection.channel(), settings)
            members = await quorum_members(nodes[0], names.events_queue)
            assert len(members) == 3, members
            (leader_name,) = [name for name, state in members.items() if state == "leader"]
            leader = next(node for node in nodes if node.node == leader_name)
            survivors = [node for node in nodes if node is not leader]
            assert len(await quorum_members(survivors[0], names.pause_queue)) == 3

            def role(args: list[str], node: PrivateNode, **extra: str) -> Proc:
                env = isolated_env(settings, AUTOPAUSE_AMQP_URL=node.url(), **extra)
                proc = spawn(autopause(*args), env)
                peak.roots.add(proc.pid)
                return proc

            worker_env = {
                "AUTOPAUSE_E2B_API_URL": emulator.url,
                "AUTOPAUSE_E2B_API_KEY": E2B_KEY,
                "AUTOPAUSE_WORKER_REPLICAS": "2",
                "AUTOPAUSE_RETRY_BASE_DELAY": "0.05",
                "AUTOPAUSE_RETRY_MAX_DELAY": "0.5",
            }
            processes = [
                role(["run", "ingest"], survivors[0]),
                role(["run", "ingest"], survivors[1]),
                role(["run", "worker"], survivors[0], **worker_env),
                role(["run", "worker"], survivors[1], **worker_env),
                role(
                    ["run", "scheduler"],
                    survivors[0],
                    AUTOPAUSE_TICK_CRON="* * * * * *",
                    AUTOPAUSE_CLAIM_MAX_SHARE="1.0",
                ),
            ]

            now = datetime.now(UTC)
            idle = [f"sbx-idle-{i:04d}" for i in range(2 * IDLE_PER_WAVE)]
            busy = [f"sbx-busy-{i:04d}" for i in range(BUSY)]
            for sandbox in idle + busy:
                emulator.add_sandbox(sandbox)
            hour_ago = now - timedelta(hours=1)

            publisher = Publisher(survivors[1].url(), names.events_exchange)
            await publisher.send(wave(idle[:IDLE_PER_WAVE], busy, hour_ago, first=True))

            async def paused_count() -> int:
                return (await store.count_by_state())[State.PAUSED]

            def alive() -> None:
                for proc in processes:
                    assert proc.alive(), proc.output(3000)

            async def some_paused() -> bool:
                alive()
                return await paused_count() >= IDLE_PER_WAVE // 5

            await wait_for(some_paused, timeout=120, what="the first pauses")

            # under load: the second wave is being published while the leader dies
            sent = len(publisher.confirmed)
            second = asyncio.create_task(
                publisher.send(wave(idle[IDLE_PER_WAVE:], busy, hour_ago, first=False), batch=50)
            )
            await wait_for(lambda: len(publisher.confirmed) > sent, timeout=60, what="the second wave")
            assert not second.done(), "the second wave was over before the kill"
            killed_at = time.monotonic()
            leader.kill()
            await second

            async def all_paused() -> bool:
                alive()
                return await paused_count() >= len(idle)

            await wait_for(all_paused, timeout=240, what="every idle sandbox paused after the kill")
            recovered = time.monotonic() - killed_at
            new_members = await quorum_members(survivors[0], names.events_queue)
            assert leader.node not in [n for n, state in new_members.items() if state == "leader"]

            await assert_nothing_lost_and_no_pause_twice(store, emulator, publisher.confirmed, idle, busy)

            all_calls = len(emulator.calls("pause"))
            elapsed = time.monotonic() - started
            print(
                f"\ncluster test: {elapsed:.1f}s wall (cluster formed in {formed:.1f}s, "
                f"recovered {recovered:.1f}s after the kill), peak memory {peak.peak / 2**20:.0f} MiB "
                f"of 3 nodes + {len(processes)} processes + the test; {len(publisher.confirmed)} events "
                f"confirmed ({publisher.retries} batch retries), {len(idle)} pauses, "
                f"{all_calls} pause calls in all"
            )
            assert await asyncio.gather(*(proc.stop() for proc in processes)) == [0] * len(processes)

"""The shipped broker configuration, booted: a private node with deploy/rabbitmq's files.

The node reads the shipped rabbitmq.conf (only the paths and ports of this
machine changed) and plugins, and imports the definitions rendered with fresh
passwords, as compose's rabbitmq-definitions service writes them. It then must
refuse oversized messages at publish, hold the users of the definitions and no
guest, apply the length limits, and serve the rabbitmq_* metrics that the alert
rules and the dashboard use.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import aiohttp
import aiormq
import pytest
from pamqp.commands import Basic

from consumer.broker import Names
from consumer.rabbitmq_definitions import write
from consumer.settings import load_settings

from ..helpers.config import ROOT
from ..helpers.monitoring import RULES, dashboard_queries
from ..helpers.rabbitmq_nodes import PrivateNode, private_nodes
from ..helpers.waiting import wait_for

pytestmark = pytest.mark.isolated  # a private RabbitMQ node only

DEPLOY = ROOT / "deploy"
OVERRIDDEN = ("load_definitions", "prometheus.tcp.port", "disk_free_limit.absolute")


@dataclass
class Booted:
    node: PrivateNode
    passwords: dict[str, str]

    def url(self, user: str) -> str:
        return self.node.url(user, self.passwords[user])

    def http(self) -> aiohttp.ClientSession:
        login = aiohttp.encode_basic_auth("admin", self.passwords["admin"])
        return aiohttp.ClientSession(
            headers={"Authorization": login}, timeout=aiohttp.ClientTimeout(total=15)
        )


def shipped_config(definitions: Path) -> str:
    """rabbitmq.conf as shipped, with this machine's definitions path (and a disk limit it can meet)."""
    keep = []
    for line in (DEPLOY / "rabbitmq" / "rabbitmq.conf").read_text().splitlines():
        key = line.split("=")[0].strip()
        if key not in OVERRIDDEN:
            keep.append(line)
    keep += [f"load_definitions = {definitions}", "disk_free_limit.absolute = 50MB"]
    return "\n".join(keep)


def shipped_plugins() -> tuple[str, ...]:
    text = (DEPLOY / "rabbitmq" / "enabled_plugins").read_text()
    return tuple(name.strip() for name in text.strip().rstrip(".").strip("[]").split(","))


@pytest.fixture
async def booted(tmp_path: Path) -> AsyncIterator[Booted]:
    template = json.loads((DEPLOY / "rabbitmq" / "definitions.json").read_text())
    passwords = {user["name"]: secrets.token_hex(20) for user in template["users"]}
    env = {user["password_env"]: passwords[user["name"]] for user in template["users"]}
    rendered = tmp_path / "definitions.json"
    write(DEPLOY / "rabbitmq" / "definitions.json", rendered, env)
    with private_nodes(tmp_path, config=shipped_config(rendered), plugins=shipped_plugins()) as (node,):
        node.start_process()
        booted = Booted(node, passwords)
        # no guest: wait for a user of the definitions
        await node.wait_ready(120, url=booted.url("producer"))
        yield booted
        await node.stop()


async def test_the_broker_refuses_messages_above_its_limit_and_no_guest(booted: Booted) -> None:
    conf = (DEPLOY / "rabbitmq" / "rabbitmq.conf").read_text()
    (limit,) = [int(v) for v in re.findall(r"^max_message_size = (\d+)$", conf, re.MULTILINE)]
    accepted = load_settings().max_message_bytes
    assert accepted < limit <= accepted + 8192, "a little above the largest event autopause accepts"

    names = Names("")
    connection = await aio_pika.connect(booted.url("producer"))
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        events = await channel.get_exchange(names.events_exchange, ensure=False)
        for size in (accepted, limit):  # the largest event; one ingest dead-letters as too_large
            confirm = await events.publish(aio_pika.Message(b"x" * size), routing_key="sandbox.activity")
            assert isinstance(confirm, Basic.Ack), size
        with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed, match="max size"):
            await events.publish(aio_pika.Message(b"x" * (limit + 1)), routing_key="sandbox.activity")

    with pytest.raises(aiormq.exceptions.ProbableAuthenticationError):
        await aio_pika.connect(booted.node.url("guest", "guest"))


async def test_the_definitions_load_with_limits_and_the_metrics_are_served(booted: Booted) -> None:
    node = booted.node
    api = f"http://127.0.0.1:{node.management_port}/api"
    async with booted.http() as http:
        async with http.get(f"{api}/users") as response:
            assert response.status == 200, await response.text()
            users = {user["name"] for user in await response.json()}
        assert users == set(booted.passwords)
        names = Names("")

        async def queues_with_policies() -> dict[str, dict[str, object]] | None:
            async with http.get(f"{api}/queues/%2F") as response:
                found = {q["name"]: q for q in await response.json()}
            return found if all(q.get("policy") for n, q in found.items() if n != names.pause_queue) else None

        queues = await wait_for(queues_with_policies, timeout=30, what="the policies on the queues")
        assert set(queues) == set(names.queues())
        for name in names.queues():
            assert queues[name]["type"] == "quorum", name
        events = queues[names.events_queue]
        assert events["policy"] == "autopause-events-limit"
        assert events["effective_policy_definition"] == {
            "max-length": 1_000_000,
            "max-length-bytes": 1_073_741_824,
            "overflow": "reject-publish",
        }
        assert (
            queues[names.events_dlq]["policy"]
            == queues[names.pause_dlq]["policy"]
            == ("autopause-dead-letters-limit")
        )

        # every rabbitmq_* name the rules and the dashboard use is served by the plugin
        prometheus = f"http://127.0.0.1:{node.prometheus_port}"
        served: set[str] = set()
        for path in ("/metrics", "/metrics/detailed?family=queue_coarse_metrics&family=queue_consumer_count"):
            async with http.get(prometheus + path) as response:
                assert response.status == 200
                for line in (await response.text()).splitlines():
                    if line and not line.startswith("#"):
                        served.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    used = set()
    for text in [RULES.read_text(), *dashboard_queries()]:
        used |= set(re.findall(r"(?<![A-Za-z0-9_:])(rabbitmq_[A-Za-z0-9_:]*)", text))
    assert used, "the rules use the broker's own metrics"
    assert used <= served, f"not served by rabbitmq_prometheus: {sorted(used - served)}"

"""The shipped RabbitMQ definitions: one user per role, each able to do its job and nothing beyond it.

The definitions are rendered with fresh passwords (as compose does before the
broker boots) and loaded into a throwaway vhost of the shared broker through
the management API: the topology, its policies, the users (renamed with a
suffix of the test's own), their permissions and topic permissions.
"""

from __future__ import annotations

import functools
import secrets
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import aiormq
import orjson
import pytest
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage, HeadersType
from pamqp.commands import Basic

from consumer.broker import (
    DETAIL_HEADER,
    PAUSE_ROUTING_KEY,
    PROBE_ROUTING_KEY,
    REASON_HEADER,
    ROUTING_KEY_HEADER,
    Names,
    declare_topology,
)
from consumer.rabbitmq_definitions import render
from consumer.settings import Settings, load_settings
from consumer.store import Store
from e2b_emulator import Emulator
from schemas import EVENT_TYPES, OUTCOME_TYPES

from ..helpers.config import AMQP_URL, DATABASE_URL
from ..helpers.database import arrived_long_ago
from ..helpers.events import ago, event
from ..helpers.management import (
    Management,
    amqp_url,
    management,
    passwords_env,
    template,
    throwaway_vhost,
    vhost_path,
)
from ..helpers.pipeline import ingest, ingest_running, tick, work
from ..helpers.processes import cli_ok
from ..helpers.waiting import wait_for

ROLES = ("ingest", "scheduler", "worker", "producer", "operator")
NAMES = Names("")
BODY = orjson.dumps(event("activity", "sbx-users-0001"))


async def queue_depth(connection: AbstractConnection, queue: str) -> tuple[int, int]:
    """(messages ready, consumers) of ``queue``, by a passive declare, as the scheduler reads them."""
    channel = await connection.channel()
    try:
        declared = await channel.declare_queue(queue, passive=True)
        result = declared.declaration_result
        return int(result.message_count or 0), int(result.consumer_count or 0)
    finally:
        await channel.close()


@dataclass(frozen=True)
class Users:
    """The definitions' users in a vhost of their own, with the passwords they were rendered with."""

    vhost: str
    names: dict[str, str]
    passwords: dict[str, str]
    api: Management

    def url(self, user: str) -> str:
        return amqp_url(self.names[user], self.passwords[user], self.vhost)

    def admin_url(self) -> str:
        parsed = urlsplit(AMQP_URL)
        return amqp_url(parsed.username or "guest", parsed.password or "guest", self.vhost)


def _vhost_scoped(rendered: dict[str, Any]) -> dict[str, Any]:
    scoped = {}
    for kind in ("exchanges", "queues", "bindings", "policies"):
        scoped[kind] = [{k: v for k, v in item.items() if k != "vhost"} for item in rendered[kind]]
    return scoped


@pytest.fixture
async def users() -> AsyncIterator[Users]:
    seed = uuid.uuid4().hex[:8]
    passwords = {user["name"]: secrets.token_hex(24) for user in template()["users"]}
    rendered = render(template(), passwords_env(passwords))
    async with management() as api, throwaway_vhost(api, "users") as vhost:
        await api.post(f"/definitions/{vhost_path(vhost)}", _vhost_scoped(rendered))
        made = Users(vhost, {}, passwords, api)
        try:
            for user in rendered["users"]:
                if "administrator" in user["tags"]:
                    continue  # an administrator would reach every vhost of the shared broker
                made.names[user["name"]] = f"{user['name']}-{seed}"
                await api.put(
                    f"/users/{made.names[user['name']]}",
                    {
                        "password_hash": user["password_hash"],
                        "hashing_algorithm": user["hashing_algorithm"],
                        "tags": "",
                    },
                )
            for grant in rendered["permissions"]:
                if grant["user"] in made.names:
                    assert grant["vhost"] == "/"
                    await api.put(
                        f"/permissions/{vhost_path(vhost)}/{made.names[grant['user']]}",
                        {kind: grant[kind] for kind in ("configure", "write", "read")},
                    )
            for grant in rendered["topic_permissions"]:
                await api.put(
                    f"/topic-permissions/{vhost_path(vhost)}/{made.names[grant['user']]}",
                    {kind: grant[kind] for kind in ("exchange", "write", "read")},
                )
            yield made
        finally:
            for name in made.names.values():
                await api.delete(f"/users/{name}")


Action = Callable[[AbstractChannel], Awaitable[Any]]


def publish(exchange: str, key: str) -> Action:
    async def act(channel: AbstractChannel) -> Any:
        target = await channel.get_exchange(exchange, ensure=False) if exchange else channel.default_exchange
        return await target.publish(aio_pika.Message(BODY, delivery_mode=2), routing_key=key)

    return act


async def _ignore(_: AbstractIncomingMessage) -> None:
    return None


def consume(queue: str) -> Action:
    async def act(channel: AbstractChannel) -> Any:
        return await (await channel.get_queue(queue, ensure=False)).consume(_ignore)

    return act


def fetch(queue: str) -> Action:
    async def act(channel: AbstractChannel) -> Any:
        return await (await channel.get_queue(queue, ensure=False)).get(fail=False)

    return act


def declare_queue(queue: str) -> Action:
    async def act(channel: AbstractChannel) -> Any:
        return await channel.declare_queue(queue, durable=True, arguments={"x-queue-type": "quorum"})

    return act


def declare_exchange(exchange: str) -> Action:
    async def act(channel: AbstractChannel) -> Any:
        return await channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, durable=True)

    return act


async def confirmed(channel: AbstractChannel, action: Action) -> None:
    assert isinstance(await action(channel), Basic.Ack)


async def refused(connection: AbstractConnection, action: Action, resource: str) -> None:
    """``action`` closes its channel with ACCESS_REFUSED, and the refusal names ``resource``."""
    channel = await connection.channel(publisher_confirms=True)
    with pytest.raises(aiormq.exceptions.ChannelAccessRefused) as refusal:
        await action(channel)
    assert resource in str(refusal.value)


async def test_each_role_does_its_job_with_its_own_user(users: Users) -> None:
    """An event's whole way through the broker, every step taken by the user of the role that takes it."""
    connections = {role: await aio_pika.connect_robust(users.url(role)) for role in ROLES}
    observer = await aio_pika.connect(users.admin_url())
    try:
        watch = await (await observer.channel()).declare_queue(exclusive=True)
        await watch.bind(NAMES.lifecycle_exchange, routing_key="#")

        # app services publish the three event types
        producer = await connections["producer"].channel(publisher_confirms=True)
        for kind in EVENT_TYPES:
            await confirmed(producer, publish(NAMES.events_exchange, kind))

        # ingest sees the depth, consumes, and dead-letters one event with its reason
        ingest = connections["ingest"]
        assert await queue_depth(ingest, NAMES.events_queue) == (3, 0)
        ingest_channel = await ingest.channel(publisher_confirms=True)
        events = await ingest_channel.get_queue(NAMES.events_queue, ensure=False)
        delivered: list[AbstractIncomingMessage] = []
        await events.consume(functools.partial(_collect, delivered))
        await wait_for(lambda: len(delivered) >= 3, timeout=10, what="ingest to receive the events")
        dlx = await ingest_channel.get_exchange(NAMES.dead_letter_exchange, ensure=False)
        letter = aio_pika.Message(BODY, delivery_mode=2, headers={REASON_HEADER: "invalid_event"})
        assert isinstance(await dlx.publish(letter, routing_key="events"), Basic.Ack)
        for msg in delivered:
            await msg.ack()
        # ... and sends itself a watermark probe through the events queue
        await confirmed(ingest_channel, publish(NAMES.events_exchange, PROBE_ROUTING_KEY))
        await wait_for(lambda: len(delivered) >= 4, timeout=10, what="ingest to receive its probe")
        await delivered[3].ack()

        # the scheduler reads both depths and publishes a pause command
        scheduler = connections["scheduler"]
        assert (await queue_depth(scheduler, NAMES.events_queue))[1] == 1  # ingest consumes
        assert await queue_depth(scheduler, NAMES.pause_queue) == (0, 0)
        commands = await scheduler.channel(publisher_confirms=True)
        await confirmed(commands, publish(NAMES.commands_exchange, PAUSE_ROUTING_KEY))

        # a worker takes the command and announces the outcome
        worker = await connections["worker"].channel(publisher_confirms=True)
        pause = await worker.get_queue(NAMES.pause_queue, ensure=False)
        command = await wait_for(lambda: pause.get(fail=False), timeout=10, what="the pause command")
        await command.ack()
        invalid = aio_pika.Message(BODY, delivery_mode=2, headers={REASON_HEADER: "invalid_command"})
        dead_commands = await worker.get_exchange(NAMES.dead_letter_exchange, ensure=False)
        assert isinstance(await dead_commands.publish(invalid, routing_key="pause"), Basic.Ack)
        for outcome in OUTCOME_TYPES:
            await confirmed(worker, publish(NAMES.lifecycle_exchange, outcome))
        announced = await wait_for(lambda: watch.get(no_ack=True, fail=False), timeout=10, what="an outcome")
        assert announced.routing_key == OUTCOME_TYPES[0]

        # the operator reads the dead letters and replays the event
        operator = connections["operator"]
        operator_channel = await operator.channel(publisher_confirms=True)
        paused_dlq = await operator_channel.get_queue(NAMES.pause_dlq, ensure=False)
        dead_command = await wait_for(lambda: paused_dlq.get(fail=False), timeout=10, what="the dead command")
        assert dead_command.headers[REASON_HEADER] == "invalid_command"
        await dead_command.ack()
        dlq = await operator_channel.get_queue(NAMES.events_dlq, ensure=False)
        dead = await wait_for(lambda: dlq.get(fail=False), timeout=10, what="the dead letter")
        assert dead.headers[REASON_HEADER] == "invalid_event"
        assert DETAIL_HEADER not in dead.headers
        await confirmed(operator_channel, publish(NAMES.events_exchange, "sandbox.activity"))
        await dead.ack()
        await wait_for(lambda: len(delivered) >= 5, timeout=10, what="the replayed event at ingest")
    finally:
        await observer.close()
        for connection in connections.values():
            await connection.close()


async def _collect(into: list[AbstractIncomingMessage], msg: AbstractIncomingMessage) -> None:
    into.append(msg)


# one step beyond each role's job: (what, the action, the resource the refusal names)
BEYOND: dict[str, list[tuple[str, Action, str]]] = {
    "ingest": [
        (
            "publish commands",
            publish(NAMES.commands_exchange, PAUSE_ROUTING_KEY),
            "exchange 'autopause.commands'",
        ),
        ("publish events", publish(NAMES.events_exchange, "sandbox.activity"), "sandbox.activity"),
        ("consume commands", consume(NAMES.pause_queue), "queue 'autopause.pause'"),
        ("read dead letters", fetch(NAMES.events_dlq), "queue 'autopause.events.dlq'"),
        ("declare its queue", declare_queue(NAMES.events_queue), "queue 'autopause.events'"),
        ("use the default exchange", publish("", NAMES.events_queue), "exchange 'amq.default'"),
    ],
    "scheduler": [
        ("consume commands", consume(NAMES.pause_queue), "queue 'autopause.pause'"),
        ("consume events", consume(NAMES.events_queue), "queue 'autopause.events'"),
        ("publish events", publish(NAMES.events_exchange, "sandbox.activity"), "exchange 'sandbox.events'"),
        (
            "announce outcomes",
            publish(NAMES.lifecycle_exchange, "sandbox.paused"),
            "exchange 'sandbox.lifecycle'",
        ),
        ("declare the commands exchange", declare_exchange(NAMES.commands_exchange), "autopause.commands"),
    ],
    "worker": [
        ("consume events", consume(NAMES.events_queue), "queue 'autopause.events'"),
        (
            "publish commands",
            publish(NAMES.commands_exchange, PAUSE_ROUTING_KEY),
            "exchange 'autopause.commands'",
        ),
        ("announce a non-outcome", publish(NAMES.lifecycle_exchange, "sandbox.activity"), "sandbox.activity"),
        ("publish events", publish(NAMES.events_exchange, "sandbox.activity"), "exchange 'sandbox.events'"),
    ],
    "producer": [
        (
            "publish commands",
            publish(NAMES.commands_exchange, PAUSE_ROUTING_KEY),
            "exchange 'autopause.commands'",
        ),
        ("publish a pause as an event", publish(NAMES.events_exchange, PAUSE_ROUTING_KEY), "sandbox.pause"),
        (
            "announce outcomes",
            publish(NAMES.lifecycle_exchange, "sandbox.paused"),
            "exchange 'sandbox.lifecycle'",
        ),
        ("dead-letter", publish(NAMES.dead_letter_exchange, "events"), "exchange 'autopause.dlx'"),
        ("skip the exchange", publish("", NAMES.events_queue), "exchange 'amq.default'"),
        ("consume events", consume(NAMES.events_queue), "queue 'autopause.events'"),
        ("read events", fetch(NAMES.events_queue), "queue 'autopause.events'"),
        ("declare a queue", declare_queue("producer.inbox"), "queue 'producer.inbox'"),
        ("declare the events exchange", declare_exchange(NAMES.events_exchange), "exchange 'sandbox.events'"),
    ],
    "operator": [
        (
            "publish commands",
            publish(NAMES.commands_exchange, PAUSE_ROUTING_KEY),
            "exchange 'autopause.commands'",
        ),
        ("replay a pause as an event", publish(NAMES.events_exchange, PAUSE_ROUTING_KEY), "sandbox.pause"),
        ("consume events", consume(NAMES.events_queue), "queue 'autopause.events'"),
        ("consume commands", consume(NAMES.pause_queue), "queue 'autopause.pause'"),
        ("dead-letter", publish(NAMES.dead_letter_exchange, "events"), "exchange 'autopause.dlx'"),
        ("declare a queue", declare_queue("operator.scratch"), "queue 'operator.scratch'"),
    ],
}


@pytest.mark.parametrize("role", ROLES)
async def test_each_user_is_refused_one_step_beyond_its_job(users: Users, role: str) -> None:
    connection = await aio_pika.connect(users.url(role))
    async with connection:
        for what, action, resource in BEYOND[role]:
            try:
                await refused(connection, action, resource)
            except BaseException as exc:
                raise AssertionError(f"{role} was not refused to {what}") from exc


async def test_a_wrong_password_is_refused(users: Users) -> None:
    with pytest.raises(aiormq.exceptions.ProbableAuthenticationError):
        await aio_pika.connect(amqp_url(users.names["ingest"], users.passwords["worker"], users.vhost))


async def test_the_shipped_topology_is_what_the_service_declares(users: Users) -> None:
    """declare_topology finds every name with the same arguments (else it would fail) and adds nothing."""

    async def snapshot() -> dict[str, Any]:
        vhost = vhost_path(users.vhost)
        queues = {q["name"]: q["arguments"] for q in await users.api.get(f"/queues/{vhost}")}
        exchanges = {
            x["name"]: x["type"]
            for x in await users.api.get(f"/exchanges/{vhost}")
            if x["name"] and not x["name"].startswith("amq.")
        }
        bindings = sorted(
            (b["source"], b["destination"], b["routing_key"])
            for b in await users.api.get(f"/bindings/{vhost}")
            if b["source"]
        )
        return {"queues": queues, "exchanges": exchanges, "bindings": bindings}

    shipped = await snapshot()
    settings = load_settings(amqp_url=users.admin_url(), topology_prefix="")
    connection = await aio_pika.connect(users.admin_url())
    async with connection:
        await declare_topology(await connection.channel(), settings)
    assert await snapshot() == shipped
    assert set(shipped["queues"]) == set(NAMES.queues())
    assert set(shipped["exchanges"]) == set(NAMES.exchanges())


async def test_the_limits_apply_to_the_events_queue_and_the_dead_letters(users: Users) -> None:
    vhost = vhost_path(users.vhost)

    async def policies() -> dict[str, str | None]:
        return {q["name"]: q.get("policy") for q in await users.api.get(f"/queues/{vhost}")}

    async def applied() -> dict[str, str | None] | None:
        found = await policies()
        return (
            found
            if all(found[name] for name in (NAMES.events_queue, NAMES.events_dlq, NAMES.pause_dlq))
            else None
        )

    found = await wait_for(applied, timeout=15, what="the policies on the queues")
    assert found[NAMES.events_queue] == "autopause-events-limit"
    assert found[NAMES.events_dlq] == found[NAMES.pause_dlq] == "autopause-dead-letters-limit"
    assert found[NAMES.pause_queue] is None


async def test_every_role_runs_with_its_own_user(users: Users, settings: Settings) -> None:
    """Ingest, a tick and a worker, each process signed in as its role's user, topology not declared."""
    async with Emulator(api_key="e2b_emulator") as emulator:

        def as_role(role: str) -> Settings:
            return load_settings(
                amqp_url=users.url(role),
                database_url=DATABASE_URL,
                database_schema=settings.database_schema,
                topology_prefix="",
                metrics_port=0,
                flush_interval=0.05,
                e2b_api_url=emulator.url,
                e2b_api_key="e2b_emulator",
                retry_base_delay=0.01,
                retry_max_delay=0.05,
                e2b_request_timeout=5.0,
                claim_max_share=1.0,
                declare_topology=False,
            )

        sandbox = f"sbx-{uuid.uuid4().hex[:12]}"
        emulator.add_sandbox(sandbox)
        producer = await aio_pika.connect(users.url("producer"))
        async with producer:
            channel = await producer.channel(publisher_confirms=True)
            events = await channel.get_exchange(NAMES.events_exchange, ensure=False)
            created = orjson.dumps(event("created", sandbox, at=ago(3600)))
            await events.publish(aio_pika.Message(created, delivery_mode=2), routing_key="sandbox.created")
            await events.publish(
                aio_pika.Message(b"not json", delivery_mode=2), routing_key="sandbox.activity"
            )

        await ingest(as_role("ingest"))
        await arrived_long_ago(as_role("ingest"))
        async with ingest_running(as_role("ingest")):  # beats and probes as its own user
            await tick(as_role("scheduler"))
        await work(as_role("worker"))
        assert emulator.state_of(sandbox) == "paused"

        operator = await aio_pika.connect(users.url("operator"))
        async with operator:
            dlq = await (await operator.channel()).get_queue(NAMES.events_dlq, ensure=False)
            rejected = await wait_for(
                lambda: dlq.get(no_ack=True, fail=False), timeout=10, what="the dead letter"
            )
            assert rejected.body == b"not json"


async def test_the_operator_commands_need_only_the_operators_rights(
    users: Users, settings: Settings, store: Store
) -> None:
    """status, dlq list and both replays as the operator, asked to declare: none of them tries to."""
    admin = await aio_pika.connect(users.admin_url())
    async with admin:
        channel = await admin.channel(publisher_confirms=True)
        dlx = await channel.get_exchange(NAMES.dead_letter_exchange, ensure=False)
        event_headers: HeadersType = {REASON_HEADER: "invalid_event", ROUTING_KEY_HEADER: "sandbox.activity"}
        await dlx.publish(
            aio_pika.Message(BODY, delivery_mode=2, headers=event_headers), routing_key="events"
        )
        command_headers: HeadersType = {REASON_HEADER: "invalid_command"}
        await dlx.publish(
            aio_pika.Message(b"{}", delivery_mode=2, headers=command_headers), routing_key="pause"
        )

        as_operator = {
            "AUTOPAUSE_AMQP_URL": users.url("operator"),
            "AUTOPAUSE_TOPOLOGY_PREFIX": "",
            "AUTOPAUSE_DECLARE_TOPOLOGY": "true",
        }
        status = orjson.loads(await cli_ok(settings, "status", "--json", **as_operator))
        assert status["dead_letters"] == {
            "events": {"invalid_event": 1},
            "pause": {"invalid_command": 1},
        }
        listed = orjson.loads(await cli_ok(settings, "dlq", "list", "--json", **as_operator))
        assert [letter["reason"] for letter in listed] == ["invalid_event"]
        assert "replayed 1 of the 1" in await cli_ok(settings, "dlq", "replay", **as_operator)
        dropped = await cli_ok(settings, "dlq", "replay", "--queue", "pause", **as_operator)
        assert "dropped 1 dead pause command" in dropped

        assert await queue_depth(admin, NAMES.events_dlq) == (0, 0)
        assert await queue_depth(admin, NAMES.pause_dlq) == (0, 0)
        assert await queue_depth(admin, NAMES.pause_queue) == (0, 0)
        events = await channel.get_queue(NAMES.events_queue, ensure=False)
        again = await wait_for(
            lambda: events.get(no_ack=True, fail=False), timeout=10, what="the replayed event"
        )
        assert (again.routing_key, again.body) == ("sandbox.activity", BODY)

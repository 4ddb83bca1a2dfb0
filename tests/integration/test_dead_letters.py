"""Dead letters through the operator's CLI: shown safely, replayed once, forged headers never trusted."""

from __future__ import annotations

import base64
import json
from datetime import timedelta
from typing import Any

import aio_pika
import orjson
import pytest

from consumer.broker import PAUSE_ROUTING_KEY, Names, message
from consumer.settings import Settings
from consumer.store import Store
from consumer.text import printable_bytes
from e2b_emulator import Emulator

from ..helpers.amqp import dead_lettered_by_the_broker, publish, publish_confirmed, queue_ready
from ..helpers.events import event, now
from ..helpers.hostile import HOSTILE_BODY
from ..helpers.pipeline import ingest, service, work
from ..helpers.processes import cli, cli_ok, terminal_safe
from ..helpers.waiting import wait_for

Channel = aio_pika.abc.AbstractChannel
HOSTILE_KEY = "sandbox_id\x1b[2J"


# -- through the CLI ---------------------------------------------------------------------------


async def _dlq_json(settings: Settings, queue: str = "events") -> list[dict[str, Any]]:
    out = await cli_ok(settings, "dlq", "list", "--queue", queue, "--json")
    assert terminal_safe(out)
    letters: list[dict[str, Any]] = orjson.loads(out)
    return letters


async def test_dlq_list_escapes_control_characters_in_bodies_and_headers(
    settings: Settings, store: Store, channel: Channel
) -> None:
    names = Names(settings.topology_prefix)
    exchange = await channel.get_exchange(names.events_exchange)
    headers = {"x-note\x1b[31m": "red\x1b[0m\u202e", "x-line": "one\ntwo"}
    extra_key = orjson.dumps(event("activity", "sbx-ok") | {HOSTILE_KEY: 1})
    await publish_confirmed(
        exchange,
        [
            ("sandbox.activity", message(HOSTILE_BODY, headers=headers)),
            ("sandbox.activity", message(extra_key)),
        ],
    )
    await ingest(settings)

    table = await cli_ok(settings, "dlq", "list")
    assert terminal_safe(table)
    assert len(table.splitlines()) == 3, "a body or detail printed a line of its own"
    assert "\\x1b[2J\\x1b[Hautopause: all clear\\n" in table
    assert "sandbox_id\\x1b[2J" in table  # the detail names the hostile field, escaped

    hostile, extra = await _dlq_json(settings)
    assert hostile["reason"] == "invalid_json" and extra["reason"] == "invalid_event"
    assert hostile["body"] == printable_bytes(HOSTILE_BODY)
    assert base64.b64decode(hostile["body_base64"]) == HOSTILE_BODY
    assert hostile["headers"]["x-note\\x1b[31m"] == "red\\x1b[0m\\u202e"
    assert hostile["headers"]["x-line"] == "one\\ntwo"
    assert extra["detail"].startswith("sandbox_id\\x1b[2J")
    assert await queue_ready(channel, names.events_dlq) == 2, "listing must leave the letters in place"


def _too_large(sandbox: str, **fields: Any) -> dict[str, Any]:
    return event("created", sandbox, metadata={f"k{i}": "v" * 200 for i in range(10)}, **fields)


async def test_replay_handles_only_the_messages_there_when_it_starts(
    settings: Settings, store: Store, channel: Channel
) -> None:
    names = Names(settings.topology_prefix)
    strict = settings.model_copy(update={"max_message_bytes": 1024})
    await publish(channel, settings, [_too_large(f"sbx-big-{i}") for i in range(30)])
    await ingest(strict)
    assert await queue_ready(channel, names.events_dlq) == 30

    # no fix yet: ingest dead-letters every replayed event again, while the replay runs
    async with service(strict, {"ingest"}):
        done = await cli_ok(settings, "dlq", "replay")
        assert f"replayed 30 of the 30 message(s) in {names.events_dlq}" in done

        async def back() -> bool:
            return await queue_ready(channel, names.events_dlq) == 30 and (
                await queue_ready(channel, names.events_queue) == 0
            )

        await wait_for(back, what="the rejected events back in the dead-letter queue")
    letters = await _dlq_json(settings)
    assert len(letters) == 30 and {d["reason"] for d in letters} == {"too_large"}
    assert await store.get_session("sbx-big-0") is None


async def test_an_event_rejected_again_returns_with_its_new_reason(
    settings: Settings, store: Store, channel: Channel
) -> None:
    # too large for the strict limit, and stamped an hour ahead: the second fault shows after the first fix
    await publish(channel, settings, [_too_large("sbx-ahead", at=now() + timedelta(hours=1))])
    strict = settings.model_copy(update={"max_message_bytes": 1024})
    await ingest(strict)
    assert [d["reason"] for d in await _dlq_json(settings)] == ["too_large"]

    assert "replayed 1 of the 1" in await cli_ok(settings, "dlq", "replay")
    await ingest(settings)
    (letter,) = await _dlq_json(settings)
    assert letter["reason"] == "invalid_event" and "occurred_at" in letter["detail"]
    assert letter["routing_key"] == "sandbox.created"
    own = {k: v for k, v in letter["headers"].items() if k.startswith("x-autopause-")}
    assert own["x-autopause-reason"] == "invalid_event"
    assert "too_large" not in json.dumps(letter)
    assert await store.get_session("sbx-ahead") is None


async def test_replaying_the_pause_queue_drops_dead_commands_and_sends_none(
    pause_settings: Settings, store: Store, channel: Channel, emulator: Emulator
) -> None:
    names = Names(pause_settings.topology_prefix)
    commands = await channel.get_exchange(names.commands_exchange)
    garbage = [b"{}", b"not json", b'{"type": "sandbox.pause", "sandbox_id": "sbx-x", "generation": -1}']
    await publish_confirmed(commands, [(PAUSE_ROUTING_KEY, message(body)) for body in garbage])
    await work(pause_settings)
    assert len(await _dlq_json(pause_settings, "pause")) == 3

    done = await cli_ok(pause_settings, "dlq", "replay", "--queue", "pause")
    assert f"dropped 3 dead pause command(s) from {names.pause_dlq}, none re-sent" in done
    assert "still PAUSING" in done and "AUTOPAUSE_PAUSE_LEASE" in done
    assert await queue_ready(channel, names.pause_dlq) == 0
    assert await queue_ready(channel, names.pause_queue) == 0
    helped = await cli_ok(pause_settings, "dlq", "replay", "--help", COLUMNS="200")
    assert "AUTOPAUSE_PAUSE_LEASE" in helped and "dropped" in helped


FORGED = {
    "x-autopause-reason": "forged",
    "X-Autopause-Detail": "forged detail",
    "x-autopause-routing-key": "sandbox.killed",
    "x-first-death-reason": "forged",
}


async def test_a_forged_reason_never_survives_into_the_dead_letter_queue(
    settings: Settings, store: Store, channel: Channel
) -> None:
    names = Names(settings.topology_prefix)
    exchange = await channel.get_exchange(names.events_exchange)
    await publish_confirmed(exchange, [("sandbox.activity", message(b"not json", headers=FORGED))])
    await ingest(settings)
    (letter,) = await _dlq_json(settings)
    assert (letter["reason"], letter["routing_key"]) == ("invalid_json", "sandbox.activity")
    assert "forged" not in json.dumps(letter)


async def test_a_forged_reason_on_a_message_the_broker_dead_letters_counts_for_nothing(
    settings: Settings, store: Store, channel: Channel
) -> None:
    body = orjson.dumps(event("created", "sbx-looping"))
    queue = await dead_lettered_by_the_broker(
        channel, settings, [("sandbox.created", message(body, headers=FORGED))]
    )

    (letter,) = await _dlq_json(settings)
    assert (letter["reason"], letter["routing_key"], letter["detail"]) == (
        "delivery limit",
        "sandbox.created",
        "",
    )
    status = orjson.loads(await cli_ok(settings, "status", "--json"))
    assert status["dead_letters"]["events"] == {"delivery limit": 1}

    # replayed under its real routing key, without the forged headers
    assert "replayed 1 of the 1" in await cli_ok(settings, "dlq", "replay")
    replayed = await wait_for(lambda: queue.get(fail=False, no_ack=True), what="the replayed event")
    assert replayed.routing_key == "sandbox.created" and replayed.body == body
    assert not {
        k for k in (replayed.headers or {}) if k.lower().startswith(("x-autopause-", "x-first-death"))
    }


@pytest.mark.parametrize("which", ["events", "pause"])
async def test_a_dead_letter_queue_that_does_not_exist_is_named(settings: Settings, which: str) -> None:
    names = Names(settings.topology_prefix)
    queue = names.events_dlq if which == "events" else names.pause_dlq
    for args in (("dlq", "list", "--queue", which), ("dlq", "replay", "--queue", which)):
        done = await cli(settings, *args)
        assert done.returncode == 1, args
        assert done.stderr.strip().startswith(f"autopause: RabbitMQ has no queue {queue}: "), done.stderr

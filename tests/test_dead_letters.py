"""Dead letters through the operator's CLI: shown safely, replayed once, forged headers never trusted."""

from __future__ import annotations

import base64
import json
from datetime import timedelta
from typing import Any

import aio_pika
import orjson
import pytest
from conftest import (
    cli,
    event,
    now,
    publish,
    publish_confirmed,
    queue_ready,
    service,
    wait_for,
)

from consumer import runner
from consumer.broker import (
    PAUSE_ROUTING_KEY,
    REASON_HEADER,
    Names,
    declare_topology,
    message,
    producer_headers,
)
from consumer.dead_letters import dead_letter_reason, original_routing_key
from consumer.settings import Settings
from consumer.store import Store
from consumer.text import printable, printable_bytes, safe_json
from e2b_emulator import Emulator

Channel = aio_pika.abc.AbstractChannel

# what a hostile producer puts in a body: clear the screen, home the cursor, print a line that
# looks like ours; a C1 CSI (raw, and as UTF-8), a bidirectional override
HOSTILE_BODY = b'\x1b[2J\x1b[Hautopause: all clear\n\x9b31m \xc2\x9b0m \xe2\x80\xae{"x": 1}'
HOSTILE_KEY = "sandbox_id\x1b[2J"


def terminal_safe(text: str) -> bool:
    """Nothing a terminal could act on: printable characters and line ends only."""
    return all(char.isprintable() or char == "\n" for char in text)


# -- pure --------------------------------------------------------------------------------------


def test_printable_escapes_what_a_terminal_acts_on() -> None:
    assert printable('plain text, {"json": "\\\\n"}') == 'plain text, {"json": "\\\\n"}'
    assert printable("a\x1b[2Jb\nc\x7f\u009b31m\u202e\u00a0\U000e0001 ok") == (
        "a\\x1b[2Jb\\nc\\x7f\\x9b31m\\u202e\\xa0\\U000e0001 ok"
    )
    assert printable_bytes(HOSTILE_BODY) == (
        '\\x1b[2J\\x1b[Hautopause: all clear\\n\\x9b31m \\x9b0m \\u202e{"x": 1}'
    )
    assert terminal_safe(printable_bytes(bytes(range(256))))


def test_json_output_parses_to_the_same_values_and_holds_nothing_a_terminal_acts_on() -> None:
    data = {"body\x1b": ["\x1b[2J", "\u009b31m", "\u202e", "\U000e0001", "a\nb", "\u00e9t\u00e9"], "n": 1}
    text = safe_json(data)
    assert terminal_safe(text)
    assert orjson.loads(text) == data
    assert "\u00e9t\u00e9" in text  # printable text stays readable


def test_the_reason_of_a_dead_letter_is_read_from_whoever_made_it() -> None:
    ours = {REASON_HEADER: "invalid_json", "x-autopause-routing-key": "sandbox.activity"}
    assert dead_letter_reason(ours) == "invalid_json"
    assert original_routing_key(ours, "events") == "sandbox.activity"
    # made by the broker: the x-autopause-* headers are whatever the producer sent
    brokers = {
        REASON_HEADER: "forged",
        "x-autopause-routing-key": "sandbox.killed",
        "x-death": [
            {"reason": "delivery_limit", "queue": "autopause.events", "routing-keys": ["sandbox.created"]}
        ],
    }
    assert dead_letter_reason(brokers) == "delivery limit"
    assert original_routing_key(brokers, "events") == "sandbox.created"
    assert dead_letter_reason({}) == "unknown"


def test_our_dead_letters_keep_no_header_that_could_pass_for_ours_or_the_brokers() -> None:
    sent = {
        "X-AutoPause-Reason": "forged",
        "x-autopause-detail": "forged",
        "x-death": [{"reason": "expired"}],
        "X-First-Death-Reason": "forged",
        "x-last-death-queue": "forged",
        "x-request-id": "abc",
    }
    assert producer_headers(sent) == {"x-request-id": "abc"}


# -- through the CLI ---------------------------------------------------------------------------


async def _dlq_json(settings: Settings, queue: str = "events") -> list[dict[str, Any]]:
    done = await cli(settings, "dlq", "list", "--queue", queue, "--json")
    assert done.returncode == 0, done.stderr
    assert terminal_safe(done.stdout)
    letters: list[dict[str, Any]] = orjson.loads(done.stdout)
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
    assert await runner.run(settings, {"ingest"}, burst=True) == 0

    table = await cli(settings, "dlq", "list")
    assert table.returncode == 0, table.stderr
    assert terminal_safe(table.stdout)
    assert len(table.stdout.splitlines()) == 3, "a body or detail printed a line of its own"
    assert "\\x1b[2J\\x1b[Hautopause: all clear\\n" in table.stdout
    assert "sandbox_id\\x1b[2J" in table.stdout  # the detail names the hostile field, escaped

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
    assert await runner.run(strict, {"ingest"}, burst=True) == 0
    assert await queue_ready(channel, names.events_dlq) == 30

    # no fix yet: ingest dead-letters every replayed event again, while the replay runs
    async with service(strict, {"ingest"}):
        done = await cli(settings, "dlq", "replay")
        assert done.returncode == 0, done.stderr
        assert f"replayed 30 of the 30 message(s) in {names.events_dlq}" in done.stdout

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
    assert await runner.run(strict, {"ingest"}, burst=True) == 0
    assert [d["reason"] for d in await _dlq_json(settings)] == ["too_large"]

    done = await cli(settings, "dlq", "replay")
    assert done.returncode == 0 and "replayed 1 of the 1" in done.stdout
    assert await runner.run(settings, {"ingest"}, burst=True) == 0
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
    assert await runner.run(pause_settings, {"worker"}, burst=True) == 0
    assert len(await _dlq_json(pause_settings, "pause")) == 3

    done = await cli(pause_settings, "dlq", "replay", "--queue", "pause")
    assert done.returncode == 0, done.stderr
    assert f"dropped 3 dead pause command(s) from {names.pause_dlq}, none re-sent" in done.stdout
    assert "still PAUSING" in done.stdout and "AUTOPAUSE_PAUSE_LEASE" in done.stdout
    assert await queue_ready(channel, names.pause_dlq) == 0
    assert await queue_ready(channel, names.pause_queue) == 0
    helped = await cli(pause_settings, "dlq", "replay", "--help", COLUMNS="200")
    assert "AUTOPAUSE_PAUSE_LEASE" in helped.stdout and "dropped" in helped.stdout


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
    assert await runner.run(settings, {"ingest"}, burst=True) == 0
    (letter,) = await _dlq_json(settings)
    assert (letter["reason"], letter["routing_key"]) == ("invalid_json", "sandbox.activity")
    assert "forged" not in json.dumps(letter)


async def test_a_forged_reason_on_a_message_the_broker_dead_letters_counts_for_nothing(
    settings: Settings, store: Store, channel: Channel
) -> None:
    names = Names(settings.topology_prefix)
    limited = settings.model_copy(update={"delivery_limit": 1})
    for queue in (names.events_queue, names.pause_queue):
        await channel.queue_delete(queue)
    await declare_topology(channel, limited)
    exchange = await channel.get_exchange(names.events_exchange)
    body = orjson.dumps(event("created", "sbx-looping"))
    await publish_confirmed(exchange, [("sandbox.created", message(body, headers=FORGED))])
    queue = await channel.get_queue(names.events_queue)
    # a consumer that keeps crashing returns the message until the broker gives up on it
    for _ in range(3):
        msg = await queue.get(fail=False)
        if msg is None:
            break
        await msg.nack(requeue=True)
    await wait_for(lambda: queue_ready(channel, names.events_dlq), what="the broker's dead letter")

    (letter,) = await _dlq_json(settings)
    assert (letter["reason"], letter["routing_key"], letter["detail"]) == (
        "delivery limit",
        "sandbox.created",
        "",
    )
    status = await cli(settings, "status", "--json")
    assert orjson.loads(status.stdout)["dead_letters"]["events"] == {"delivery limit": 1}

    # replayed under its real routing key, without the forged headers
    done = await cli(settings, "dlq", "replay")
    assert done.returncode == 0 and "replayed 1 of the 1" in done.stdout
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

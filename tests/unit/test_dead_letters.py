"""Dead letters and operator output: escaping what a terminal acts on, reasons read from whoever made them."""

from __future__ import annotations

import orjson

from consumer.broker import REASON_HEADER, producer_headers
from consumer.dead_letters import dead_letter_reason, original_routing_key
from consumer.text import printable, printable_bytes, safe_json

from ..helpers.hostile import HOSTILE_BODY
from ..helpers.processes import terminal_safe


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

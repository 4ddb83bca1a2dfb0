"""The edge: bytes -> a contract model, or the reason it is not one; hypothesis breaks valid events."""

from __future__ import annotations

import uuid
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from consumer.ingest import Rejected, parse
from consumer.state import Event
from schemas import COMMAND_ADAPTER

from ..helpers.events import ago, event, now
from ..helpers.hostile import INVALID, LIMIT, Message, context, encoded, hostile, json_values, unusual_events

REASONS = {"invalid_json", "not_an_object", "missing_type", "unknown_type", "invalid_event", "too_large"}


@pytest.mark.parametrize(
    ("body", "reason"), INVALID, ids=[f"{reason}-{i}" for i, (_, reason) in enumerate(INVALID)]
)
def test_parse_names_the_reason_of_each_invalid_message(body: bytes, reason: str) -> None:
    parsed = parse(body, limit=16_384, context={})
    assert isinstance(parsed, Rejected), body
    assert parsed.reason == reason, (body[:60], parsed)


@given(body=st.one_of(st.binary(max_size=LIMIT + 64), json_values.map(encoded)))
@hypothesis_settings(max_examples=400, deadline=None, database=None)
def test_parse_never_raises_on_arbitrary_bytes(body: bytes) -> None:
    parsed = parse(body, limit=LIMIT, context=context())
    if isinstance(parsed, Rejected):
        assert parsed.reason in REASONS and 0 < len(parsed.detail) <= 500, parsed
    else:
        assert isinstance(parsed, Event)
        # an accepted body is a JSON object of a known type, about the sandbox it names
        decoded = orjson.loads(body)
        assert (decoded["type"], decoded["sandbox_id"]) == (parsed.type, parsed.sandbox_id)


@given(message=hostile)
@hypothesis_settings(max_examples=400, deadline=None, database=None)
def test_parse_names_the_reason_of_each_kind_of_hostile_message(message: Message) -> None:
    body, reason = message
    parsed = parse(body, limit=LIMIT, context=context())
    assert isinstance(parsed, Rejected), body[:200]
    assert parsed.reason == reason, (body[:200], parsed)


@given(body=unusual_events())
@hypothesis_settings(max_examples=200, deadline=None, database=None)
def test_parse_accepts_every_valid_event(body: dict[str, Any]) -> None:
    data = encoded(body)
    parsed = parse(data, limit=LIMIT, context=context())
    if len(data) > LIMIT:
        assert parsed == Rejected("too_large", f"{len(data)} bytes > {LIMIT}")
    else:
        assert not isinstance(parsed, Rejected), (body, parsed)
        assert str(parsed.event_id) == body["event_id"] and parsed.sandbox_id == body["sandbox_id"]


def test_a_field_of_the_wrong_shape_is_an_invalid_event_not_a_non_object() -> None:
    body = encoded({**event("created", "sbx-0001", at=ago(10)), "metadata": ["k", "v"]})
    assert parse(body, limit=LIMIT, context=context()) == Rejected(
        "invalid_event", "metadata: Input should be an object"
    )


def test_a_unix_time_in_a_string_is_not_an_rfc3339_time() -> None:
    epoch = str(int(now().timestamp()))
    body = encoded({**event("activity", "sbx-0001"), "occurred_at": epoch})
    parsed = parse(body, limit=LIMIT, context=context())
    command = {
        "command_id": str(uuid.uuid4()),
        "sandbox_id": "sbx-0001",
        "generation": 1,
        "issued_at": epoch,
    }
    with pytest.raises(ValueError):
        COMMAND_ADAPTER.validate_json(encoded(command))
    assert isinstance(parsed, Rejected) and parsed.reason == "invalid_event", parsed


# hostile events through the real broker and ingest -----------------------------

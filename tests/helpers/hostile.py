"""Hostile messages for the edge, each built with the reason it must be rejected with.

Every hostile message is made by breaking a valid one (or from scratch) in a
known way, so a test knows, without asking the code under test, why it must be
rejected: that reason is the oracle for the parse result and the
``x-autopause-reason`` header of its dead letter.
"""

from __future__ import annotations

import random
import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
from hypothesis import strategies as st

from schemas import EVENT_TYPES

from .events import ago, event, now

LIMIT = 16_384  # the default max_message_bytes, which the settings fixture keeps
SANDBOX_ID = re.compile(r"[a-z0-9][a-z0-9-]{2,63}")
REF = r"[A-Za-z0-9][A-Za-z0-9_.:@/-]{0,127}"
META_KEY = r"[A-Za-z0-9_.-]{1,64}"
SOURCES = ("terminal", "file", "preview", "agent", "api", "other")
REQUIRED = {
    "sandbox.created": ("event_id", "occurred_at", "sandbox_id", "project_id", "user_id", "template"),
    "sandbox.activity": ("event_id", "occurred_at", "sandbox_id", "source"),
    "sandbox.killed": ("event_id", "occurred_at", "sandbox_id"),
}
FIELDS = {
    "sandbox.created": {*REQUIRED["sandbox.created"], "type", "idle_timeout_s", "metadata"},
    "sandbox.activity": {*REQUIRED["sandbox.activity"], "type"},
    "sandbox.killed": {*REQUIRED["sandbox.killed"], "type", "reason"},
}
HOSTILE_IDS = [
    "Robert'); DROP TABLE sandbox_sessions;--",
    "' OR '1'='1",
    "sbx-1; DELETE FROM sandbox_sessions",
    "sbx-1\x00",
    "sbx\x00-1",
    "sbx-1\n",
    "sbx-1\r\nX-Injected: yes",
    "sbx-\u200b1",
    "sbx-\u0131",
    "SBX-1",
    "sbx_1",
    "-sbx",
    "sb",
    "s" * 65,
    "",
    "sbx-1 ",
    "%s%s%s",
    "$1",
    "sbx-1\u2028",
    "\U0001f4a3\U0001f4a3\U0001f4a3",
]
BAD_UTF8 = [
    b"\xff",
    b"\xfe",
    b"\xc0\xaf",
    b"\xed\xa0\x80",
    b"\x80",
    b"\xf8\x88\x80\x80\x80",
    b"\xf4\x90\x80\x80",
]
NOT_A_TIME = ["yesterday", "", "2026-13-45T99:99:99Z", "now", "2026-01-01", "T", "\x00", "29/11/2026 10:00"]
FAR_TIMES = [
    "9999-12-31T23:59:59+00:00",
    "9999-12-31T23:59:59-23:59",
    "0001-01-01T00:00:00+00:00",
    "0001-01-01T00:00:00+23:59",
    "1970-01-01T00:00:00Z",
]

# what a hostile producer puts in a body: clear the screen, home the cursor, print a line that
# looks like ours; a C1 CSI (raw, and as UTF-8), a bidirectional override
HOSTILE_BODY = b'\x1b[2J\x1b[Hautopause: all clear\n\x9b31m \xc2\x9b0m \xe2\x80\xae{"x": 1}'
YEAR = 365.25 * 86_400
Message = tuple[bytes, str]  # body, reason it must be rejected with


# valid events, some with unusual but legal content ----------------------------

# Anything a producer may put in a free-form field: every Unicode scalar value, control
# characters and line separators included, except NUL (the contract refuses it).
free_text = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=40)
refs = st.from_regex(REF, fullmatch=True)
pool_ids = st.integers(0, 79).map(lambda i: f"sbx-{i:04d}")
odd_ids = st.from_regex(SANDBOX_ID.pattern, fullmatch=True)
offsets = st.integers(-1439, 1439).map(lambda m: timezone(timedelta(minutes=m)))


@st.composite
def valid_times(draw: st.DrawFn) -> str:
    """Within the accepted span (30 days back, 5 minutes ahead), in any UTC offset."""
    seconds = draw(st.floats(-200, 29 * 86_400, allow_nan=False))
    return (now() - timedelta(seconds=seconds)).astimezone(draw(offsets)).isoformat()


@st.composite
def unusual_events(draw: st.DrawFn) -> dict[str, Any]:
    """A valid event that stretches the contract: odd ids, UTC offsets, Unicode text."""
    kind = draw(st.sampled_from(["created", "activity", "killed"]))
    sid = draw(st.one_of(pool_ids, odd_ids))
    body = event(kind, sid)
    body["event_id"] = str(draw(st.uuids()))
    body["occurred_at"] = draw(valid_times())
    if kind == "created":
        body.update(project_id=draw(refs), user_id=draw(refs), template=draw(refs))
        body["metadata"] = draw(
            st.dictionaries(st.from_regex(META_KEY, fullmatch=True), free_text, max_size=4)
        )
        body["idle_timeout_s"] = draw(st.one_of(st.none(), st.integers(30, 7 * 86_400)))
    elif kind == "activity":
        body["source"] = draw(st.sampled_from(SOURCES))
    else:
        body["reason"] = draw(st.one_of(st.none(), free_text))
    return body


def plain_traffic(rng: random.Random, n: int) -> list[dict[str, Any]]:
    """The bulk: ordinary events of a small fleet, so sandboxes get several each."""
    bodies = []
    for _ in range(n):
        sid = f"sbx-{rng.randrange(80):04d}"
        kind = rng.choices(["created", "activity", "killed"], [3, 12, 1])[0]
        bodies.append(event(kind, sid, at=ago(rng.uniform(0, 3000))))
    return bodies


# hostile messages, each with the reason it must be rejected with ---------------

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
non_objects = st.one_of(json_scalars, st.lists(json_values, max_size=4))
non_strings = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.lists(json_values, max_size=3),
    st.dictionaries(st.text(max_size=8), json_values, max_size=3),
)


@st.composite
def base_event(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["created", "activity", "killed"]))
    return event(kind, draw(pool_ids), at=ago(draw(st.floats(0, 3000))))


def encoded(body: Any) -> bytes:
    return orjson.dumps(body)


@st.composite
def truncated(draw: st.DrawFn) -> Message:
    body = encoded(draw(base_event()))
    return body[: draw(st.integers(0, len(body) - 1))], "invalid_json"


@st.composite
def bad_utf8(draw: st.DrawFn) -> Message:
    body = encoded(draw(base_event())) if draw(st.booleans()) else draw(st.binary(max_size=40))
    at = draw(st.integers(0, len(body)))
    return body[:at] + draw(st.sampled_from(BAD_UTF8)) + body[at:], "invalid_json"


@st.composite
def too_large(draw: st.DrawFn) -> Message:
    body = encoded(draw(base_event()))
    size = draw(st.integers(LIMIT + 1, 256 * 1024))
    if draw(st.booleans()):
        return b" " * (size - len(body)) + body, "too_large"  # valid JSON, just too big
    return draw(st.sampled_from([b"[", b"{", b"x", b"\x00"])) * size, "too_large"


@st.composite
def not_an_object(draw: st.DrawFn) -> Message:
    value = draw(non_objects)
    return encoded(value), "not_an_object"


@st.composite
def deep_nesting(draw: st.DrawFn) -> Message:
    depth = draw(st.integers(300, 3000))
    opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
    body = opener * depth + b"1" + closer * depth
    return (body, "too_large") if len(body) > LIMIT else (body, "invalid_json")


@st.composite
def without_type(draw: st.DrawFn) -> Message:
    if draw(st.booleans()):
        body = draw(base_event())
    else:
        body = draw(st.dictionaries(st.text(max_size=10), json_values, max_size=6))
    body.pop("type", None)
    return encoded(body), "missing_type"


@st.composite
def unknown_type(draw: st.DrawFn) -> Message:
    body = draw(base_event())
    body["type"] = draw(
        st.one_of(
            st.sampled_from(
                [
                    "sandbox.pause",
                    "sandbox.paused",
                    "SANDBOX.CREATED",
                    "sandbox.created ",
                    " sandbox.activity",
                    "sandbox.killed\x00",
                    "sandbox.*",
                    "sandbox.exploded",
                ]
            ),
            st.text(max_size=30),
            non_strings,
        ).filter(lambda t: t not in EVENT_TYPES)
    )
    return encoded(body), "unknown_type"


@st.composite
def wrong_field_type(draw: st.DrawFn) -> Message:
    body = draw(base_event())
    name = draw(st.sampled_from(REQUIRED[body["type"]]))
    body[name] = draw(non_strings)
    return encoded(body), "invalid_event"


@st.composite
def hostile_id(draw: st.DrawFn) -> Message:
    body = draw(base_event())
    sid = draw(
        st.one_of(
            st.sampled_from(HOSTILE_IDS),
            st.text(max_size=70),
            st.builds(lambda a, b: a + b, odd_ids, st.sampled_from(["\n", "\x00", "'", ";", " ", "\u00e9"])),
        ).filter(lambda s: not SANDBOX_ID.fullmatch(s))
    )
    body["sandbox_id"] = sid
    return encoded(body), "invalid_event"


@st.composite
def far_time(draw: st.DrawFn) -> Message:
    body = draw(base_event())
    choice = draw(st.integers(0, 3))
    if choice == 0:  # an hour to seven thousand years ahead
        ahead = draw(st.floats(3600, 7000 * YEAR))
        body["occurred_at"] = (now() + timedelta(seconds=ahead)).isoformat()
    elif choice == 1:  # 31 days to two thousand years back
        back = draw(st.floats(31 * 86_400, 2000 * YEAR))
        body["occurred_at"] = (now() - timedelta(seconds=back)).isoformat()
    elif choice == 2:
        body["occurred_at"] = draw(st.sampled_from(FAR_TIMES))
    else:  # no offset, or no time at all
        naive = now().replace(tzinfo=None).isoformat()
        body["occurred_at"] = draw(st.sampled_from([naive, *NOT_A_TIME]))
    return encoded(body), "invalid_event"


@st.composite
def missing_field(draw: st.DrawFn) -> Message:
    body = draw(base_event())
    del body[draw(st.sampled_from(REQUIRED[body["type"]]))]
    return encoded(body), "invalid_event"


@st.composite
def extra_field(draw: st.DrawFn) -> Message:
    body = draw(base_event())
    key = draw(st.text(max_size=20).filter(lambda k: k not in FIELDS[body["type"]]))
    body[key] = draw(json_values)
    return encoded(body), "invalid_event"


@st.composite
def bad_created_fields(draw: st.DrawFn) -> Message:
    body = event("created", draw(pool_ids), at=ago(10))
    choice = draw(st.integers(0, 6))
    if choice == 0:  # nested garbage inside metadata
        body["metadata"] = {"k": draw(non_strings)}
    elif choice == 5:  # metadata that is not an object at all
        body["metadata"] = draw(non_objects)
    elif choice == 6:  # NUL, which no Postgres text or jsonb value can hold
        text = draw(free_text)
        at = draw(st.integers(0, len(text)))
        body["metadata"] = {"k": text[:at] + "\x00" + text[at:]}
    elif choice == 1:
        body["metadata"] = {f"k{i}": "v" for i in range(draw(st.integers(17, 40)))}
    elif choice == 2:
        body["metadata"] = {"k": "v" * draw(st.integers(257, 2000))}
    elif choice == 3:
        key = draw(st.text(max_size=70).filter(lambda k: not re.fullmatch(META_KEY, k)))
        body["metadata"] = {key: "v"}
    else:
        body["idle_timeout_s"] = draw(
            st.one_of(
                st.integers(-(2**63), 29),
                st.integers(7 * 86_400 + 1, 2**63 - 1),
                st.floats(30, 600),
                st.booleans(),
                st.text(max_size=5),
            )
        )
    return encoded(body), "invalid_event"


@st.composite
def garbage_object(draw: st.DrawFn) -> Message:
    body = draw(st.dictionaries(st.text(max_size=10), json_values, max_size=6))
    if draw(st.booleans()):
        body["type"] = draw(st.sampled_from(EVENT_TYPES))
    if "type" not in body:
        return encoded(body), "missing_type"
    if body["type"] not in EVENT_TYPES:
        return encoded(body), "unknown_type"
    body["event_id"] = [body.get("event_id")]  # never a valid event
    return encoded(body), "invalid_event"


hostile = st.one_of(
    truncated(),
    bad_utf8(),
    too_large(),
    not_an_object(),
    deep_nesting(),
    without_type(),
    unknown_type(),
    wrong_field_type(),
    hostile_id(),
    far_time(),
    missing_field(),
    extra_field(),
    bad_created_fields(),
    garbage_object(),
)


def context() -> dict[str, Any]:
    """The parse context of ingest at this moment, with the default clock skew."""
    return {"now": datetime.now(UTC), "clock_skew": timedelta(seconds=300)}


# one of each kind, with the reason ingest names (as parse and as the dead letter's header)
INVALID: list[tuple[bytes, str]] = [
    (b"{not json", "invalid_json"),
    (b"\xff\xfe\x00garbage", "invalid_json"),
    (b"[1, 2, 3]", "not_an_object"),
    (orjson.dumps({"type": "sandbox.exploded", "sandbox_id": "sbx-1"}), "unknown_type"),
    (orjson.dumps({"sandbox_id": "sbx-1"}), "missing_type"),
    (orjson.dumps({**event("activity", "sbx-1"), "source": "telepathy"}), "invalid_event"),
    (orjson.dumps({**event("activity", "sbx-1"), "extra": 1}), "invalid_event"),
    (orjson.dumps(event("activity", "Robert'); DROP TABLE sandbox_sessions;--")), "invalid_event"),
    (orjson.dumps(event("activity", "sbx-1", at=ago(-86_400))), "invalid_event"),
    (
        orjson.dumps({**event("activity", "sbx-1"), "occurred_at": "2026-01-01T00:00:00"}),
        "invalid_event",
    ),
    (orjson.dumps({**event("created", "sbx-1"), "metadata": {"k": "v" * 20_000}}), "too_large"),
]

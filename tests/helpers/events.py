"""Events as a producer sends them, traffic of a fleet, and the rows that traffic must give."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

Rows = dict[str, tuple[str, datetime]]


def now() -> datetime:
    return datetime.now(UTC)


def ago(seconds: float) -> datetime:
    return now() - timedelta(seconds=seconds)


def ids(prefix: str, n: int) -> list[str]:
    """``n`` sandbox ids: prefix-0000, prefix-0001, ..."""
    return [f"{prefix}-{i:04d}" for i in range(n)]


def event(kind: str, sandbox_id: str, *, at: datetime | None = None, **fields: Any) -> dict[str, Any]:
    """A valid event as a producer would send it."""
    body: dict[str, Any] = {
        "event_id": str(uuid.uuid4()),
        "type": f"sandbox.{kind}",
        "occurred_at": (at or now()).isoformat(),
        "sandbox_id": sandbox_id,
    }
    if kind == "created":
        body.update(project_id="proj-1", user_id="user-1", template="base")
    elif kind == "activity":
        body.update(source="terminal")
    body.update(fields)
    return body


def activities(sandbox_ids: list[str]) -> list[dict[str, Any] | bytes]:
    """One activity event for each sandbox."""
    return [event("activity", sid) for sid in sandbox_ids]


def traffic(sandboxes: int, seed: int = 7) -> list[dict[str, Any]]:
    """created + several activities (+ some kills) per sandbox, shuffled, with duplicates."""
    rng = random.Random(seed)
    events: list[dict[str, Any]] = []
    for i in range(sandboxes):
        sid = f"sbx-{i:06d}"
        events.append(event("created", sid, at=ago(3000)))
        for _ in range(3):
            events.append(event("activity", sid, at=ago(rng.uniform(0, 2900))))
        if i % 10 == 0:
            events.append(event("killed", sid, at=ago(rng.uniform(0, 100))))
    events += rng.sample(events, len(events) // 20)  # redeliveries
    rng.shuffle(events)
    return events


def expected_rows(events: list[dict[str, Any]]) -> Rows:
    """sandbox -> (state, last_activity) that the events must produce, computed independently."""
    rows: Rows = {}
    for body in events:
        at = datetime.fromisoformat(body["occurred_at"])
        state, last = rows.get(body["sandbox_id"], ("RUNNING", at))
        if body["type"] == "sandbox.killed":
            state = "KILLED"
        rows[body["sandbox_id"]] = (state, max(last, at))
    return rows

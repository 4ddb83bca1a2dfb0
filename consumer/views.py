"""Plain-text views of operator data, for a terminal.

Every cell goes through :func:`consumer.text.printable`: producers write
metadata, dead letters and error texts, and none of it may act on the terminal.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import orjson

from consumer.dead_letters import DeadLetter
from consumer.store import SessionRecord, TransitionRecord
from consumer.text import printable, printable_bytes


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, dict):
        return printable(orjson.dumps(value).decode())
    return printable(str(value))


def status(report: dict[str, Any]) -> str:
    sessions = report["sessions"]
    parts = [
        "sessions   " + "  ".join(f"{state} {n}" for state, n in sessions.items()),
        "",
        table(
            ["queue", "messages", "consumers", "limit", ""],
            [
                (name, q["messages"], q["consumers"], q["limit"], "FULL" if q["full"] else "")
                if q is not None
                else (name, "missing", "-", "", "")
                for name, q in report["queues"].items()
            ],
        ),
        "",
    ]
    tick = report["last_tick"]
    if tick:
        parts.append(
            f"last tick  {tick['tick_at']} by {tick['replica']}: {tick['outcome']}, "
            f"claimed {tick['claimed']}, republished {tick['republished']}, expired {tick['expired']}"
        )
    else:
        parts.append("last tick  none yet")
    hour = report["last_hour"]
    parts.append(
        f"last hour  paused {hour['paused']}, resumed {hour['resumed']}, "
        f"failed {hour['pause_failed']}, dry-run {hour['dry_run']}"
    )
    parts.append("dead letters  " + "; ".join(_reasons(k, v) for k, v in report["dead_letters"].items()))
    parts.append(
        f"savings    {report['paused_seconds']:.0f} sandbox-seconds paused"
        f" = ${report['savings_usd']:.4f} (estimated)"
    )
    return "\n".join(parts)


def _reasons(queue: str, counts: dict[str, int] | None) -> str:
    if counts is None:
        return f"{queue}: no queue"
    if not counts:
        return f"{queue}: none"
    return f"{queue}: " + ", ".join(f"{printable(reason)} {n}" for reason, n in counts.items())


def sessions(rows: list[SessionRecord]) -> str:
    if not rows:
        return "no sessions match"
    return table(
        ["sandbox", "state", "project", "user", "last activity", "pause due"],
        [
            (
                r.sandbox_id,
                r.state,
                r.project_id,
                r.user_id,
                r.last_activity,
                r.pause_due_at,
            )
            for r in rows
        ],
    )


def session(row: SessionRecord, history: list[TransitionRecord]) -> str:
    shown = [
        "sandbox_id", "state", "project_id", "user_id", "template", "idle_timeout_s", "last_activity",
        "pause_due_at", "generation", "paused_at", "killed_at", "keep_alive_until", "retry_after",
        "pause_attempts", "last_error", "metadata", "created_at", "updated_at",
    ]  # fmt: skip
    width = max(map(len, shown))
    lines = [f"{key.ljust(width)}  {_cell(getattr(row, key))}" for key in shown]
    lines += ["", "transitions:"]
    lines.append(
        table(
            ["at", "from", "to", "reason", "actor", "generation"],
            [(h.at, h.from_state, h.to_state, h.reason, h.actor, h.generation) for h in history],
        )
    )
    return "\n".join(lines)


def dead_letters(letters: list[DeadLetter]) -> str:
    if not letters:
        return "the dead-letter queue is empty"
    return table(
        ["routing key", "reason", "detail", "body"],
        [
            (d.routing_key, d.reason, _clip(printable(d.detail)), _clip(printable_bytes(d.body)))
            for d in letters
        ],
    )


def _clip(text: str, width: int = 60) -> str:
    """At most ``width`` characters of already escaped text."""
    return text if len(text) <= width else text[: width - 1] + "…"

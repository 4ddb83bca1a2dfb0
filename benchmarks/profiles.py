"""Reading cProfile output: where a process spent its time, by package, ours against the libraries'.

Under asyncio a coroutine's "call" in cProfile is one resumption, so the
cumulative time of a coroutine counts its time on the CPU, not its waits: the
figures add up to the work done, and the wait in ``epoll`` shows as idle.
Self time is grouped by package; C functions go with their library when
their name tells it, else with the code that called them.
"""

from __future__ import annotations

import pstats
from pathlib import Path
from typing import Any

# (group, path fragments); the first match wins, so the more specific come first.
GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("ours", ("/consumer/", "/schemas/", "/benchmarks/")),
    ("e2b sdk", ("/e2b/", "/e2b_connect/", "/attr/", "/attrs/")),
    ("httpx/pyqwest", ("/httpx/", "/httpcore/", "/pyqwest/", "/h11/", "/h2/", "/anyio/")),
    ("aio-pika", ("/aio_pika/", "/aiormq/", "/pamqp/")),
    ("asyncpg", ("/asyncpg/",)),
    ("pydantic", ("/pydantic/", "/pydantic_core/")),
    ("asyncio", ("/asyncio/",)),
    ("logging/metrics", ("/logging/", "/prometheus_client/")),
)
# C functions that belong to a library whatever calls them.
C_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("pydantic", ("pydantic_core",)),
    ("asyncpg", ("asyncpg",)),
    ("socket I/O", ("_socket.socket", "_ssl.")),
)
IDLE = "idle (epoll wait)"
Key = tuple[str, int, str]
ENTRY_POINTS = ("consumer/cli.py", "consumer/__main__.py", "benchmarks/profiled.py")


def group_of(key: Key) -> str:
    """The group of a Python function, or of a C function by its name ("C builtins" when unknown)."""
    filename, _, name = key
    if filename == "~":
        if "poll" in name and ("epoll" in name or "select" in name):
            return IDLE
        for group, fragments in C_GROUPS:
            if any(fragment in name for fragment in fragments):
                return group
        return "C builtins"
    for group, fragments in GROUPS:
        if any(fragment in filename for fragment in fragments):
            return group
    return "stdlib and other"


def _self_times(table: dict[Key, Any]) -> dict[str, float]:
    """Self time by group; a C function of no known library counts for the group of its callers."""
    by_group: dict[str, float] = {}
    for key, (_, _, own, _, callers) in table.items():
        group = group_of(key)
        if group == "C builtins" and callers:
            for caller, edge in callers.items():
                by_caller = group_of(caller)
                by_group[by_caller] = by_group.get(by_caller, 0.0) + edge[2]
            continue
        by_group[group] = by_group.get(group, 0.0) + own
    return by_group


def label(key: Key) -> str:
    filename, line, name = key
    if filename == "~":
        return name
    for marker in ("site-packages/", "/work/main/", "/lib/python3"):
        if marker in filename:
            filename = filename.split(marker, 1)[1]
            break
    return f"{filename}:{line}({name})"


def summarize(path: Path, *, top: int = 8) -> dict[str, Any]:
    """Self time by group, and the top cumulative entries of our code and of the SDK/HTTP stack."""
    stats = pstats.Stats(str(path))
    table: dict[Key, Any] = stats.stats  # type: ignore[attr-defined]
    by_group = _self_times(table)
    total = sum(by_group.values())
    busy = total - by_group.get(IDLE, 0.0)

    def best(groups: set[str]) -> list[dict[str, Any]]:
        chosen = [
            (key, row)
            for key, row in table.items()
            if group_of(key) in groups and not key[0].endswith(ENTRY_POINTS)
        ]
        chosen.sort(key=lambda item: item[1][3], reverse=True)
        return [
            {"where": label(key), "cumulative_s": round(row[3], 3), "calls": row[1]}
            for key, row in chosen[:top]
        ]

    return {
        "profiled_s": round(total, 2),
        "busy_s": round(busy, 2),
        "self_s_by_group": {g: round(s, 2) for g, s in sorted(by_group.items(), key=lambda i: -i[1])},
        "top_ours": best({"ours"}),
        "top_sdk_http": best({"e2b sdk", "httpx/pyqwest"}),
        "top_broker_db": best({"aio-pika", "asyncpg"}),
    }


def render(title: str, summary: dict[str, Any]) -> str:
    """The summary as text for the console."""
    busy = summary["busy_s"] or 1e-9
    lines = [
        f"-- profile: {title}",
        f"   {summary['profiled_s']:.2f} s profiled, {summary['busy_s']:.2f} s busy (not waiting in epoll)",
        "   self time by package (share of busy time):",
    ]
    for group, seconds in summary["self_s_by_group"].items():
        share = "" if group == IDLE else f" {100 * seconds / busy:5.1f}%"
        lines.append(f"     {group:<20} {seconds:7.2f} s{share}")
    for key, heading in (
        ("top_ours", "top cumulative, our code"),
        ("top_sdk_http", "top cumulative, e2b SDK and HTTP stack"),
        ("top_broker_db", "top cumulative, aio-pika and asyncpg"),
    ):
        if summary[key]:
            lines.append(f"   {heading}:")
            lines += [f"     {e['cumulative_s']:7.3f} s {e['calls']:>8}  {e['where']}" for e in summary[key]]
    return "\n".join(lines)

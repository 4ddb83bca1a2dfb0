"""The named SQL blocks of ``sql/queries.sql``, checked against the names the store uses when loaded."""

from __future__ import annotations

import re
from functools import cache
from importlib import resources
from typing import Literal, get_args

QueryName = Literal[
    "lock_sessions",
    "insert_sessions",
    "update_sessions",
    "insert_transitions",
    "begin_tick",
    "finish_tick",
    "release_lease",
    "try_advisory_lock",
    "advisory_unlock",
    "running_count",
    "prune_ticks",
    "claim_idle",
    "make_due",
    "renew_expired_leases",
    "renew_leases_and_probe",
    "expire_paused",
    "release_claims",
    "unpark_dry_run",
    "commands_backed",
    "begin_attempts",
    "renew_attempt",
    "record_attempt",
    "finish_pauses",
    "take_repairs",
    "take_own_repair",
    "finish_repair",
    "delay_repair",
    "pending_repairs",
    "beat_ingest",
    "advance_watermark",
    "forget_ingest",
    "ingest_replicas",
    "retire_ingest",
    "keep_alive",
    "get_session",
    "session_transitions",
    "list_sessions",
    "count_by_state",
    "last_tick",
    "transitions_since",
    "paused_usage",
    "start_reconcile",
    "finish_reconcile",
    "reconcile_view",
    "known_sandboxes",
    "resumed_outside",
    "paused_outside",
    "gone",
    "adopt",
    "record_sizes",
    "db_now",
    "schema_migrated",
    "applied_migrations",
    "resume_by_operator",
    "gone_by_operator",
]

_BLOCK = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


class QueryFileError(RuntimeError):
    """queries.sql and the names the store runs disagree: a packaging or editing mistake."""


def parse(text: str) -> dict[str, str]:
    """Split a file of ``-- name: x`` blocks; raise QueryFileError unless it has exactly the known names."""
    parts = _BLOCK.split(text)
    names = parts[1::2]
    blocks = {name: body.strip() for name, body in zip(names, parts[2::2], strict=True)}
    known = set(get_args(QueryName))
    problems = []
    if twice := sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"named twice: {', '.join(twice)}")
    if missing := sorted(known - blocks.keys()):
        problems.append(f"missing: {', '.join(missing)}")
    if unknown := sorted(blocks.keys() - known):
        problems.append(f"not in QueryName: {', '.join(unknown)}")
    if empty := sorted(name for name, body in blocks.items() if not body):
        problems.append(f"empty: {', '.join(empty)}")
    if problems:
        raise QueryFileError("queries.sql: " + "; ".join(problems))
    return blocks


@cache
def queries() -> dict[str, str]:
    """The named SQL blocks, loaded and checked once."""
    return parse(resources.files("consumer.sql").joinpath("queries.sql").read_text())

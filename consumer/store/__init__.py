"""The Postgres store: the named statements of ``sql/queries.sql``, grouped by the role that runs them.

:class:`Store` is one asyncpg pool (``base``) with every role's statements:
ingest's (``ingest``), the scheduler's (``ticks``), the worker's (``pauses``),
reconcile's (``reconcile``) and operators' (``operator``). Each returns the
project's own types (``records``), never driver rows. Errors are translated
in ``base``: :class:`~consumer.errors.StoreRejected` for data PostgreSQL
refuses, :class:`~consumer.errors.StoreUnavailable` for everything else.
"""

from __future__ import annotations

from consumer.store.base import UNAVAILABLE
from consumer.store.ingest import Decide, IngestStatements
from consumer.store.operator import OperatorStatements
from consumer.store.pauses import PauseStatements
from consumer.store.reconcile import ReconcileStatements
from consumer.store.records import (
    Attempt,
    Backing,
    BatchOutcome,
    Claim,
    IngestView,
    LiveRow,
    Moved,
    PauseEnd,
    PauseFinished,
    Prices,
    Probe,
    Repair,
    ReplicaBeat,
    SandboxFacts,
    SessionRecord,
    TickRecord,
    TickStart,
    TransitionRecord,
)
from consumer.store.sql import QueryName, queries
from consumer.store.ticks import TickStatements


class Store(IngestStatements, TickStatements, PauseStatements, ReconcileStatements, OperatorStatements):
    """One asyncpg pool and every statement autopause runs on it."""


__all__ = [
    "UNAVAILABLE",
    "Attempt",
    "Backing",
    "BatchOutcome",
    "Claim",
    "Decide",
    "IngestView",
    "LiveRow",
    "Moved",
    "PauseEnd",
    "PauseFinished",
    "Prices",
    "Probe",
    "QueryName",
    "Repair",
    "ReplicaBeat",
    "SandboxFacts",
    "SessionRecord",
    "Store",
    "TickRecord",
    "TickStart",
    "TransitionRecord",
    "queries",
]

"""Message contracts of autopause (no I/O): the models and their generated documents."""

from schemas.events import (
    COMMAND_ADAPTER,
    EVENT_ADAPTER,
    EVENT_TYPES,
    OUTCOME_TYPES,
    CommandReason,
    Outcome,
    OutcomeType,
    PauseCommand,
    SandboxActivity,
    SandboxCreated,
    SandboxEvent,
    SandboxKilled,
)

__all__ = [
    "COMMAND_ADAPTER",
    "EVENT_ADAPTER",
    "EVENT_TYPES",
    "OUTCOME_TYPES",
    "CommandReason",
    "Outcome",
    "OutcomeType",
    "PauseCommand",
    "SandboxActivity",
    "SandboxCreated",
    "SandboxEvent",
    "SandboxKilled",
]

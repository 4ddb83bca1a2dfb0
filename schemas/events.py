"""Message contracts of autopause: what app services publish, and what autopause publishes.

Every message is one UTF-8 JSON object whose routing key equals its ``type``.
The models are strict: no extra properties, no coercion, bounded sizes. The JSON
Schema and AsyncAPI documents beside this module are generated from them
(``python -m schemas.generate``) and a test keeps them in step.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationInfo,
    field_validator,
)

SANDBOX_ID_PATTERN = r"^[a-z0-9][a-z0-9-]{2,63}$"
REF_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:@/-]{0,127}$"
META_KEY_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"

SandboxId = Annotated[str, StringConstraints(pattern=SANDBOX_ID_PATTERN)]
Ref = Annotated[str, StringConstraints(pattern=REF_PATTERN)]
MetaKey = Annotated[str, StringConstraints(pattern=META_KEY_PATTERN)]
# NUL is refused everywhere: PostgreSQL cannot store it in text or jsonb
MetaValue = Annotated[str, StringConstraints(max_length=256, pattern=r"^[^\x00]*$")]
FreeText = Annotated[str, StringConstraints(max_length=200, pattern=r"^[^\x00]*$")]

MIN_IDLE_TIMEOUT_S = 30
MAX_IDLE_TIMEOUT_S = 7 * 86_400
DEFAULT_CLOCK_SKEW = timedelta(minutes=5)
DEFAULT_MAX_AGE = timedelta(days=30)
RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")


def _rfc3339(value: object) -> object:
    """Only RFC 3339 text with an offset: pydantic alone would also take Unix seconds in a string."""
    if not isinstance(value, str):
        return value
    if not RFC3339.match(value):
        raise ValueError("must be an RFC 3339 date-time with an offset, e.g. 2026-11-29T10:15:00Z")
    return datetime.fromisoformat(value)


Rfc3339Time = Annotated[AwareDatetime, BeforeValidator(_rfc3339)]

ActivitySource = Literal["terminal", "file", "preview", "agent", "api", "other"]
CommandReason = Literal["idle", "manual", "lease_expired"]
OutcomeType = Literal["sandbox.paused", "sandbox.pause_failed", "sandbox.gone"]


class Contract(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class Envelope(Contract):
    """Fields that every event carries."""

    event_id: UUID = Field(description="unique per event; the idempotency key")
    occurred_at: Rfc3339Time = Field(description="when it happened, RFC 3339 with offset")
    sandbox_id: SandboxId = Field(description="the E2B sandbox id")

    @field_validator("occurred_at")
    @classmethod
    def _within_clock(cls, value: datetime, info: ValidationInfo) -> datetime:
        """Reject times beyond the clock-skew allowance or older than the age limit.

        The validation context may carry ``now``, ``clock_skew`` and ``max_age``
        (tests and the ingest role pass them); otherwise the wall clock is used.
        """
        context: dict[str, Any] = info.context or {}
        now: datetime = context.get("now") or datetime.now(UTC)
        skew: timedelta = context.get("clock_skew", DEFAULT_CLOCK_SKEW)
        max_age: timedelta = context.get("max_age", DEFAULT_MAX_AGE)
        if value > now + skew:
            raise ValueError(f"occurred_at is more than {skew} in the future")
        if value < now - max_age:
            raise ValueError(f"occurred_at is more than {max_age} in the past")
        return value


class SandboxCreated(Envelope):
    """A sandbox was created for a project; autopause starts tracking it."""

    type: Literal["sandbox.created"] = "sandbox.created"
    project_id: Ref
    user_id: Ref
    template: Ref = Field(description="E2B template id or alias")
    idle_timeout_s: int | None = Field(
        None,
        ge=MIN_IDLE_TIMEOUT_S,
        le=MAX_IDLE_TIMEOUT_S,
        description="seconds idle before a pause; the service default when absent",
    )
    metadata: dict[MetaKey, MetaValue] = Field(default_factory=dict, max_length=16)


class SandboxActivity(Envelope):
    """Someone used the sandbox: a terminal keystroke, a file write, a preview hit..."""

    type: Literal["sandbox.activity"] = "sandbox.activity"
    source: ActivitySource


class SandboxKilled(Envelope):
    """The app killed the sandbox; it will never be paused again."""

    type: Literal["sandbox.killed"] = "sandbox.killed"
    reason: FreeText | None = None


SandboxEvent = Annotated[SandboxCreated | SandboxActivity | SandboxKilled, Field(discriminator="type")]
EVENT_TYPES: tuple[str, ...] = ("sandbox.created", "sandbox.activity", "sandbox.killed")
EVENT_ADAPTER: TypeAdapter[SandboxCreated | SandboxActivity | SandboxKilled] = TypeAdapter(SandboxEvent)


class PauseCommand(Contract):
    """Pause this sandbox, if its row still backs the command (state PAUSING, same generation)."""

    command_id: UUID
    type: Literal["sandbox.pause"] = "sandbox.pause"
    sandbox_id: SandboxId
    generation: int = Field(ge=1, le=2**62)
    issued_at: Rfc3339Time
    reason: CommandReason = "idle"


COMMAND_ADAPTER: TypeAdapter[PauseCommand] = TypeAdapter(PauseCommand)


class Outcome(Contract):
    """What became of a pause: published on ``sandbox.lifecycle`` for app services."""

    event_id: UUID
    type: OutcomeType
    occurred_at: Rfc3339Time
    sandbox_id: SandboxId
    generation: int = Field(ge=1)
    dry_run: bool = False
    error: Annotated[str, StringConstraints(max_length=500)] | None = None


OUTCOME_TYPES: tuple[OutcomeType, ...] = ("sandbox.paused", "sandbox.pause_failed", "sandbox.gone")

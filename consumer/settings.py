"""The one settings object, built once at start-up from ``AUTOPAUSE_*`` variables.

Nothing below the CLI reads ``os.environ``: every role receives a frozen
:class:`Settings`. Every CLI flag has its environment twin (the CLI builds the
object from ``Settings(**overrides)``, so flags win over the environment).
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from consumer.errors import ConfigError

ENV_PREFIX = "AUTOPAUSE_"

# E2B's lifecycle API limit: 20,000 requests per 30 s per team, all replicas together.
E2B_LIFECYCLE_LIMIT_PER_S = 20_000 / 30

# E2B's published prices (USD per second) and its default sandbox size: 2 vCPU, 512 MiB.
VCPU_PRICE_PER_S = 0.000014
GIB_PRICE_PER_S = 0.0000045

_NAME_PREFIX = re.compile(r"^[a-z0-9_.-]{0,40}$")
_SQL_IDENT = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class PauseMode(StrEnum):
    """What a pause keeps: memory and filesystem, or the filesystem only."""

    FULL = "full"
    FILESYSTEM = "filesystem"


class LogFormat(StrEnum):
    TEXT = "text"
    JSON = "json"


Positive = Annotated[float, Field(gt=0)]


class Settings(BaseSettings):
    """Every setting of autopause; the environment variable is ``AUTOPAUSE_`` + the name."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        frozen=True,
        extra="ignore",
        case_sensitive=False,
        populate_by_name=True,
    )

    # connections
    amqp_url: SecretStr = Field(SecretStr("amqp://guest:guest@127.0.0.1:5672/"), description="RabbitMQ URL")
    database_url: SecretStr = Field(
        SecretStr("postgresql://postgres@127.0.0.1:5432/test"), description="PostgreSQL URL"
    )
    database_schema: str = Field("public", description="Postgres schema that holds the tables")
    topology_prefix: str = Field(
        "", description="prefix for every exchange and queue name (isolates deployments)"
    )
    db_pool_size: int = Field(10, ge=2, le=200, description="Postgres connections per process")
    declare_topology: bool = Field(
        True,
        description="declare exchanges, queues and bindings at start"
        " (false where the broker's definitions hold them and roles may not configure)",
    )

    # ingest
    batch_size: int = Field(500, ge=1, le=10_000, description="events per ingest transaction")
    flush_interval: Positive = Field(0.2, le=60, description="seconds before a partial batch is written")
    prefetch: int = Field(2000, ge=1, le=65_535, description="unacked events per ingest consumer")
    max_message_bytes: int = Field(16_384, ge=512, le=1_048_576, description="largest accepted event body")
    clock_skew: Positive = Field(300, description="seconds an event may lie in the future")
    delivery_limit: int = Field(20, ge=1, le=1000, description="redeliveries before RabbitMQ dead-letters")
    events_queue_max_length: int = Field(
        0,
        ge=0,
        description="most messages the events queue holds (0: no cap); a full queue nacks producers."
        " Declared when autopause declares the topology; set it to a broker policy's max-length"
        " otherwise, so that status and metrics show the queue filling",
    )
    dead_letter_max_length: int = Field(
        0,
        ge=0,
        description="most messages each dead-letter queue holds (0: no cap), as events_queue_max_length;"
        " a dead letter the full queue refuses stays in its source queue",
    )
    ingest_beat_interval: Positive = Field(
        0.5,
        le=10,
        description="seconds between an ingest replica's heartbeats and watermark probes; a deadline"
        " waits for the next probe before a tick may claim it",
    )
    producer_skew_warning: Positive = Field(
        60, description="warn when a producer's events arrive this many seconds off their stamps"
    )

    # scheduler
    tick_cron: str = Field(
        "*/5 * * * * *", description="cron spec of the idle tick (5 fields, or 6 with seconds first)"
    )
    default_idle_timeout: Positive = Field(600, description="seconds idle before a pause")
    claim_batch_size: int = Field(1000, ge=1, le=50_000, description="rows claimed per statement")
    claim_max_share: float = Field(
        0.1, gt=0, le=1, description="largest share of the running fleet one tick may claim"
    )
    claim_hard_cap: int = Field(10_000, ge=1, description="most claims in one tick")
    claim_min_per_tick: int = Field(10, ge=0, description="a small fleet may always lose this many per tick")
    events_backlog_limit: int = Field(
        10_000, ge=0, description="the tick claims nothing while more events wait or are in hand"
    )
    ingest_stale_after: Positive = Field(
        5, description="the tick claims nothing when no ingest heartbeat is this recent"
    )
    ingest_max_lag: Positive = Field(
        60, description="the tick claims nothing when the ingest watermark is older than this"
    )
    ingest_retire_after: Positive = Field(
        120, description="seconds before a silent ingest replica no longer holds the watermark back"
    )
    pause_lease: Positive = Field(600, description="seconds before an unfinished pause is resent")
    retention_days: float = Field(30, ge=0, description="PAUSED rows older than this become EXPIRED (0: off)")
    auto_pause_enabled: bool = Field(True, description="kill switch: false stops claiming")

    # worker
    worker_concurrency: int = Field(64, ge=1, le=1024, description="pauses in flight per worker")
    e2b_rate_limit: Positive = Field(
        E2B_LIFECYCLE_LIMIT_PER_S * 0.9, description="E2B calls per second, all workers together"
    )
    worker_replicas: int = Field(1, ge=1, le=1000, description="worker processes sharing the rate")
    pause_max_attempts: int = Field(5, ge=1, le=50, description="tries of a retryable pause")
    retry_base_delay: Positive = Field(0.5, description="first retry backoff in seconds")
    retry_max_delay: Positive = Field(30, description="largest retry backoff in seconds")
    retry_after: Positive = Field(300, description="seconds a failed sandbox is left alone")
    end_at_max_age: Positive = Field(
        120,
        description="seconds a sandbox's end of life from E2B's listing (reconcile) spares the"
        " get_info a worker otherwise makes before its pause",
    )
    repair_interval: Positive = Field(
        1.0, le=60, description="seconds between looks for sandboxes a pause may have hit in use"
    )
    resume_timeout: int = Field(
        3600,
        ge=60,
        le=86_400,
        description="lifetime in seconds given to a sandbox resumed after a pause hit it in use,"
        " when its end time before the pause is unknown",
    )
    busy_cpu_percent: float = Field(
        10,
        ge=0,
        le=100,
        description="CPU use (percent of its vCPUs) in E2B's latest sample at or above which"
        " a sandbox is busy and not paused (0: no check)",
    )
    busy_cpu_sample_age: Positive = Field(
        30, description="seconds after which a CPU sample is too old to keep a sandbox running"
    )
    reconcile_cron: str = Field(
        "* * * * *", description="cron spec of reconcile with E2B's own list (5 or 6 fields)"
    )
    reconcile_metadata: str = Field(
        "",
        description="adopt running sandboxes no app announced when their metadata has all these"
        " key=value pairs, comma-separated (empty: adopt none, only repair known rows)",
    )
    reconcile_gone_checks: int = Field(
        100, ge=0, le=10_000, description="most unlisted sandboxes one reconcile confirms gone"
    )
    dry_run: bool = Field(False, description="record would-be pauses, call nothing")
    pause_mode: PauseMode = Field(PauseMode.FULL, description="full (memory+disk) or filesystem")

    # E2B
    e2b_api_key: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices("AUTOPAUSE_E2B_API_KEY", "E2B_API_KEY"),
        description="E2B API key (or E2B_API_KEY)",
    )
    e2b_api_url: str | None = Field(None, description="E2B API URL (default: E2B's)")
    e2b_request_timeout: Positive = Field(30, le=600, description="seconds per E2B call")
    emulator: bool = Field(False, description="start and use the built-in E2B emulator")

    # operations
    metrics_host: str = Field("0.0.0.0", description="address of /metrics, /healthz, /readyz")
    metrics_port: int = Field(9464, ge=0, le=65_535, description="port of the same (0: off)")
    log_format: LogFormat = Field(LogFormat.TEXT, description="text or json")
    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING or ERROR")
    price_per_vcpu_second: float = Field(
        VCPU_PRICE_PER_S, ge=0, description="USD a running sandbox costs per vCPU and second"
    )
    price_per_gib_second: float = Field(
        GIB_PRICE_PER_S, ge=0, description="USD a running sandbox costs per GiB of memory and second"
    )
    default_cpu_count: int = Field(2, ge=1, le=64, description="vCPUs of a sandbox whose size is unknown")
    default_memory_mb: int = Field(
        512, ge=128, le=262_144, description="MiB of a sandbox whose size is unknown"
    )
    shutdown_grace: Positive = Field(30, description="seconds to finish in-flight work on stop")

    @field_validator("topology_prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        if not _NAME_PREFIX.match(value):
            raise ValueError("use at most 40 of a-z 0-9 _ . -")
        return value

    @field_validator("database_schema")
    @classmethod
    def _check_schema(cls, value: str) -> str:
        if not _SQL_IDENT.match(value):
            raise ValueError("must be a lower-case SQL identifier")
        return value

    @field_validator("log_level")
    @classmethod
    def _check_level(cls, value: str) -> str:
        level = value.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError("must be DEBUG, INFO, WARNING or ERROR")
        return level

    @field_validator("reconcile_metadata")
    @classmethod
    def _check_scope(cls, value: str) -> str:
        parse_scope(value)
        return value

    @field_validator("tick_cron", "reconcile_cron")
    @classmethod
    def _check_cron(cls, value: str) -> str:
        from consumer.timing import validate_cron

        validate_cron(value)
        return value

    @model_validator(mode="after")
    def _check_together(self) -> Settings:
        if self.retry_max_delay < self.retry_base_delay:
            raise ValueError("retry_max_delay must be at least retry_base_delay")
        if self.prefetch < self.batch_size:
            raise ValueError("prefetch must be at least batch_size")
        if self.command_budget > self.pause_lease:
            raise ValueError(
                f"{env_name('pause_lease')} ({self.pause_lease:g} s) must be longer than a pause command"
                f" can take: {env_name('pause_max_attempts')} ({self.pause_max_attempts}) attempts of two"
                f" calls of {env_name('e2b_request_timeout')} ({self.e2b_request_timeout:g} s) each, plus"
                f" their backoff, is {self.command_budget:g} s; raise the lease or lower the others"
            )
        if self.ingest_max_lag < self.ingest_stale_after:
            raise ValueError(
                f"{env_name('ingest_max_lag')} must be at least {env_name('ingest_stale_after')}"
            )
        return self

    # derived values, kept here so that every role sizes itself the same way
    @property
    def worker_rate(self) -> float:
        """This process's share of the E2B call rate."""
        return self.e2b_rate_limit / self.worker_replicas

    @property
    def attempt_hold(self) -> float:
        """Seconds one pause attempt holds its row: its two E2B calls at their bound, and a margin."""
        return 2 * (self.e2b_request_timeout + 1) + 2

    @property
    def command_budget(self) -> float:
        """The longest a pause command can take: every attempt and the backoff between them."""
        backoff = sum(
            min(self.retry_max_delay, self.retry_base_delay * 2.0**k)
            for k in range(self.pause_max_attempts - 1)
        )
        return float(self.pause_max_attempts * self.attempt_hold + backoff)

    @property
    def reconcile_scope(self) -> dict[str, str] | None:
        """The metadata a stray running sandbox must carry to be adopted; None: adopt none."""
        return parse_scope(self.reconcile_metadata) or None

    @property
    def e2b_key(self) -> str | None:
        return self.e2b_api_key.get_secret_value() if self.e2b_api_key else None

    # start-up
    startup_patience: Positive = Field(
        30,
        le=600,
        description="seconds a process retries PostgreSQL, RabbitMQ and (a worker) the E2B API at start"
        " before it gives up: compose starts services in any order",
    )


def parse_scope(text: str) -> dict[str, str]:
    """``app=builder,team=x`` -> {"app": "builder", "team": "x"}; raises ValueError when malformed."""
    scope: dict[str, str] = {}
    for pair in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{pair!r}: use key=value pairs separated by commas")
        scope[key.strip()] = value.strip()
    return scope


def env_name(field: str) -> str:
    """The environment variable that sets ``field``."""
    return ENV_PREFIX + field.upper()


def load_settings(**overrides: Any) -> Settings:
    """Build settings from the environment and ``overrides``, or raise ConfigError naming the culprit."""
    given = {key: value for key, value in overrides.items() if value is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            text = str(error["msg"]).removeprefix("Value error, ")
            field = ".".join(str(part) for part in error["loc"])
            if not field:  # a rule over several settings names them itself
                problems.append(text)
                continue
            name = env_name(field) if field in Settings.model_fields else field
            problems.append(f"{name}: {text}")
        raise ConfigError("invalid settings: " + "; ".join(problems)) from None


def secret_values(settings: Settings) -> list[str]:
    """The strings that must never reach a log line."""
    values = [settings.e2b_key]
    for url in (settings.amqp_url, settings.database_url):
        values.append(urlsplit(url.get_secret_value()).password)
    return [value for value in values if value and len(value) >= 4]

"""Prometheus metrics of every role, in the process-wide default registry."""

from __future__ import annotations

from prometheus_client import REGISTRY, Counter, Gauge, Histogram


def value(name: str, **labels: str) -> float:
    """The current value of a sample of this process's metrics (0 when never set)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


EVENTS_INGESTED = Counter("autopause_events_ingested_total", "Events applied to the session table", ["type"])
EVENTS_REJECTED = Counter("autopause_events_rejected_total", "Events dead-lettered as invalid", ["reason"])
EVENTS_STALE = Counter("autopause_events_stale_total", "Activity for sandboxes already KILLED or EXPIRED")
BATCH_SIZE = Histogram(
    "autopause_ingest_batch_size",
    "Events per ingest transaction",
    buckets=(1, 5, 10, 50, 100, 250, 500, 1000, 2500, 5000),
)
BATCH_SECONDS = Histogram("autopause_ingest_batch_seconds", "Time to write one ingest batch to Postgres")
INGEST_LAG = Histogram(
    "autopause_ingest_lag_seconds",
    "now - occurred_at of the oldest event of each committed batch",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900),
)
TRANSITIONS = Counter(
    "autopause_transitions_total", "Changes of session state", ["actor", "to_state", "reason"]
)
SESSIONS = Gauge("autopause_sessions", "Sessions by state (sampled)", ["state"])
STORE_ERRORS = Counter(
    "autopause_store_unavailable_total", "Operations that found Postgres unreachable", ["role"]
)

TICKS = Counter("autopause_ticks_total", "Scheduler ticks", ["outcome"])
CLAIMS = Counter("autopause_claims_total", "Sessions claimed for a pause", ["reason"])
TICK_SECONDS = Histogram("autopause_tick_seconds", "Duration of a scheduler tick")

PAUSE_CALLS = Counter("autopause_pause_calls_total", "E2B pause calls by outcome", ["outcome"])
COMMANDS_DROPPED = Counter(
    "autopause_commands_dropped_total", "Pause commands dropped without an E2B call", ["reason"]
)
PAUSES = Counter("autopause_pauses_total", "Pause commands finished", ["result"])
E2B_LATENCY = Histogram(
    "autopause_e2b_call_seconds",
    "E2B API call latency",
    ["operation"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
RATE_LIMIT_WAIT = Histogram(
    "autopause_rate_limiter_wait_seconds",
    "Time a pause waited for a rate-limiter token",
    buckets=(0.001, 0.01, 0.05, 0.1, 0.5, 1, 5, 30),
)
IN_FLIGHT = Gauge("autopause_pauses_in_flight", "Pause commands being worked on")

# safety: pauses that hit a sandbox in use, the ingest watermark, producer clocks
PAUSED_IN_USE = Counter(
    "autopause_paused_in_use_total", "Pauses that raced with activity; the sandbox was resumed at once"
)
INGEST_UNSETTLED = Gauge(
    "autopause_ingest_unsettled", "Deliveries this ingest replica holds, not yet committed or dead-lettered"
)
WATERMARK_LAG = Gauge(
    "autopause_ingest_watermark_lag_seconds",
    "Age of the ingest watermark at the last tick: every event published before it is committed",
)
PRODUCER_SKEW = Gauge(
    "autopause_producer_clock_skew_seconds",
    "Arrival time minus occurred_at, the smallest in the last batch, per producer (app_id or user)",
    ["producer"],
)
CLAIMS_RELEASED = Counter(
    "autopause_claims_released_total", "Claims returned to RUNNING without a pause", ["reason"]
)
QUEUE_MESSAGES = Gauge("autopause_queue_messages", "Messages ready in a queue (sampled by ticks)", ["queue"])
QUEUE_CONSUMERS = Gauge("autopause_queue_consumers", "Consumers of a queue (sampled by ticks)", ["queue"])
QUEUE_LIMIT = Gauge(
    "autopause_queue_limit",
    "Most messages a queue holds (its configured max-length); absent for a queue with no cap",
    ["queue"],
)
AUTO_PAUSE_ENABLED = Gauge(
    "autopause_auto_pause_enabled", "1 while the scheduler may claim, 0 when switched off"
)
LAST_TICK_SUCCESS = Gauge(
    "autopause_last_successful_tick_timestamp_seconds", "Unix time of the last tick that ran without error"
)
OUTAGES = Counter(
    "autopause_outage_retries_total",
    "Operations held and retried while a service was away",
    ["role", "service"],
)
DEAD_LETTERS = Counter(
    "autopause_dead_letters_total", "Messages autopause dead-lettered, with the reason", ["queue", "reason"]
)
ACKS_VOID = Counter(
    "autopause_acks_void_total", "Settled deliveries whose channel had closed; the broker redelivers them"
)
RECONCILE_RUNS = Counter(
    "autopause_reconcile_runs_total", "Reconcile runs with E2B's list, by outcome", ["outcome"]
)
RECONCILE_CHANGES = Counter(
    "autopause_reconcile_changes_total", "Rows reconcile changed, by reason", ["reason"]
)
BUSY_CPU = Counter("autopause_busy_cpu_total", "Pauses not made: E2B's latest sample showed the CPU busy")

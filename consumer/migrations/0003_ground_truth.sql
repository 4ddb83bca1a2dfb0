-- What E2B itself says: sandbox sizes (for savings by size), reconcile runs,
-- and the reconcile step as an actor of the transitions log.

ALTER TABLE sandbox_sessions
    ADD COLUMN cpu_count integer,
    ADD COLUMN memory_mb integer,
    -- when E2B's listing last gave the sandbox's end of life (e2b_end_at)
    ADD COLUMN e2b_seen_at timestamptz;

ALTER TABLE session_transitions DROP CONSTRAINT session_transitions_actor_check;
ALTER TABLE session_transitions ADD CONSTRAINT session_transitions_actor_check
    CHECK (actor IN ('ingest', 'scheduler', 'worker', 'cli', 'reconcile'));

-- One row per reconcile fire time: the run is deduplicated across replicas, as ticks are.
CREATE TABLE reconcile_runs (
    run_at       timestamptz PRIMARY KEY,
    replica      text NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished_at  timestamptz,
    listed       integer,
    requests     integer,
    changes      jsonb,
    error        text
);

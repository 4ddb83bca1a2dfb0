-- What closing the race and outage holes needs: per-attempt leases, repairs of
-- pauses that hit a sandbox in use, arrival times, dry-run parking, and the
-- ingest replicas' heartbeats and watermarks.

ALTER TABLE sandbox_sessions
    -- the pause attempt in flight (at most one per claim): who holds it, and until when
    ADD COLUMN attempt_id uuid,
    ADD COLUMN attempt_until timestamptz,
    -- E2B's end of life for the sandbox when it was last read, and what was left of it at the pause
    ADD COLUMN e2b_end_at timestamptz,
    ADD COLUMN lifetime_left_s double precision,
    -- a pause may have hit the sandbox in use: a worker must check E2B and resume it
    ADD COLUMN resume_requested_at timestamptz,
    -- when the newest event arrived (ingest's clock), whatever its stamp said
    ADD COLUMN last_arrived_at timestamptz,
    -- parked by a dry run; a live scheduler makes such rows due again
    ADD COLUMN dry_run_at timestamptz;

UPDATE sandbox_sessions SET last_arrived_at = last_activity WHERE last_arrived_at IS NULL;
ALTER TABLE sandbox_sessions ALTER COLUMN last_arrived_at SET NOT NULL,
    ALTER COLUMN last_arrived_at SET DEFAULT now();

-- rows a dry run parked far in the future (9999-01-01) before dry_run_at existed
UPDATE sandbox_sessions SET dry_run_at = now() WHERE state = 'RUNNING' AND pause_due_at >= '9999-01-01';

CREATE INDEX sandbox_sessions_repairs ON sandbox_sessions (resume_requested_at)
    WHERE resume_requested_at IS NOT NULL;
CREATE INDEX sandbox_sessions_dry_run ON sandbox_sessions (dry_run_at) WHERE dry_run_at IS NOT NULL;

ALTER TABLE session_transitions ADD COLUMN detail jsonb;
ALTER TABLE scheduler_ticks ADD COLUMN detail jsonb;

-- One row per live ingest replica: its heartbeat, what it holds, and its watermark
-- (every event published to the events queue before it has been committed or
-- dead-lettered by this replica's consumer).
CREATE TABLE ingest_replicas (
    replica           text PRIMARY KEY,
    beat_at           timestamptz NOT NULL DEFAULT now(),
    held              integer NOT NULL DEFAULT 0,
    held_redelivered  integer NOT NULL DEFAULT 0,
    watermark         timestamptz
);

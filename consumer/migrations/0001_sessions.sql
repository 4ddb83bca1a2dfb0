-- Sessions, their transitions log, and the scheduler's tick record.

CREATE TABLE sandbox_sessions (
    sandbox_id        text PRIMARY KEY,
    project_id        text,
    user_id           text,
    template          text,
    idle_timeout_s    integer,
    metadata          jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_event_id  uuid,
    created_event_at  timestamptz,
    state             text NOT NULL
                      CHECK (state IN ('RUNNING', 'PAUSING', 'PAUSED', 'KILLED', 'EXPIRED')),
    last_activity     timestamptz NOT NULL,
    pause_due_at      timestamptz NOT NULL,
    generation        bigint NOT NULL DEFAULT 0,
    claimed_activity  timestamptz,
    claimed_at        timestamptz,
    paused_at         timestamptz,
    killed_at         timestamptz,
    expired_at        timestamptz,
    keep_alive_until  timestamptz,
    retry_after       timestamptz,
    pause_attempts    integer NOT NULL DEFAULT 0,
    last_error        text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX sandbox_sessions_project ON sandbox_sessions (project_id);
CREATE INDEX sandbox_sessions_user ON sandbox_sessions (user_id);
CREATE INDEX sandbox_sessions_state ON sandbox_sessions (state);
-- the scheduler's idle query: RUNNING rows by deadline
CREATE INDEX sandbox_sessions_idle ON sandbox_sessions (pause_due_at) WHERE state = 'RUNNING';
-- unfinished pauses whose lease may run out
CREATE INDEX sandbox_sessions_pausing ON sandbox_sessions (claimed_at) WHERE state = 'PAUSING';
-- the retention sweep
CREATE INDEX sandbox_sessions_paused ON sandbox_sessions (paused_at) WHERE state = 'PAUSED';

CREATE TABLE session_transitions (
    id          bigserial PRIMARY KEY,
    sandbox_id  text NOT NULL,
    from_state  text,
    to_state    text NOT NULL,
    reason      text NOT NULL,
    actor       text NOT NULL CHECK (actor IN ('ingest', 'scheduler', 'worker', 'cli')),
    generation  bigint NOT NULL,
    at          timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE INDEX session_transitions_sandbox ON session_transitions (sandbox_id, id);
CREATE INDEX session_transitions_at ON session_transitions (at);

CREATE TABLE scheduler_ticks (
    tick_at      timestamptz PRIMARY KEY,
    replica      text NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished_at  timestamptz,
    claimed      integer NOT NULL DEFAULT 0,
    republished  integer NOT NULL DEFAULT 0,
    expired      integer NOT NULL DEFAULT 0,
    skipped      text,
    error        text
);

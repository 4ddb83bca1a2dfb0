-- Every statement autopause runs, as named blocks: "-- name: <name>" starts one.
-- consumer/store.py loads them once and runs them by name.

-- name: lock_sessions
SELECT * FROM sandbox_sessions
WHERE sandbox_id = ANY($1::text[])
ORDER BY sandbox_id
FOR UPDATE;

-- name: insert_sessions
INSERT INTO sandbox_sessions (
    sandbox_id, project_id, user_id, template, idle_timeout_s, metadata,
    created_event_id, created_event_at, state, last_activity, pause_due_at, killed_at)
SELECT * FROM unnest(
    $1::text[], $2::text[], $3::text[], $4::text[], $5::int[], $6::jsonb[],
    $7::uuid[], $8::timestamptz[], $9::text[], $10::timestamptz[], $11::timestamptz[],
    $12::timestamptz[])
ORDER BY 1
ON CONFLICT (sandbox_id) DO NOTHING
RETURNING sandbox_id;

-- name: update_sessions
UPDATE sandbox_sessions AS s SET
    project_id = u.project_id, user_id = u.user_id, template = u.template,
    idle_timeout_s = u.idle_timeout_s, metadata = u.metadata,
    created_event_id = u.created_event_id, created_event_at = u.created_event_at,
    state = u.state, last_activity = u.last_activity, pause_due_at = u.pause_due_at,
    killed_at = u.killed_at, claimed_activity = u.claimed_activity, updated_at = now()
FROM unnest(
    $1::text[], $2::text[], $3::text[], $4::text[], $5::int[], $6::jsonb[],
    $7::uuid[], $8::timestamptz[], $9::text[], $10::timestamptz[], $11::timestamptz[],
    $12::timestamptz[], $13::timestamptz[])
    AS u(sandbox_id, project_id, user_id, template, idle_timeout_s, metadata,
         created_event_id, created_event_at, state, last_activity, pause_due_at,
         killed_at, claimed_activity)
WHERE s.sandbox_id = u.sandbox_id;

-- name: insert_transitions
INSERT INTO session_transitions (sandbox_id, from_state, to_state, reason, actor, generation)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[]);

-- name: start_tick
INSERT INTO scheduler_ticks (tick_at, replica) VALUES ($1, $2)
ON CONFLICT (tick_at) DO NOTHING
RETURNING tick_at;

-- name: finish_tick
UPDATE scheduler_ticks
SET finished_at = clock_timestamp(), claimed = $2, republished = $3, expired = $4,
    skipped = $5, error = $6
WHERE tick_at = $1;

-- name: try_tick_lock
SELECT pg_try_advisory_lock(hashtext($1));

-- name: tick_unlock
SELECT pg_advisory_unlock(hashtext($1));

-- name: running_count
SELECT count(*) FROM sandbox_sessions WHERE state = 'RUNNING';

-- name: claim_idle
WITH due AS (
    SELECT sandbox_id FROM sandbox_sessions
    WHERE state = 'RUNNING' AND pause_due_at <= now()
    ORDER BY pause_due_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE sandbox_sessions AS s
    SET state = 'PAUSING', generation = s.generation + 1, claimed_activity = s.last_activity,
        claimed_at = now(), pause_attempts = 0, updated_at = now()
    FROM due WHERE s.sandbox_id = due.sandbox_id
    RETURNING s.sandbox_id, s.generation
), logged AS (
    INSERT INTO session_transitions (sandbox_id, from_state, to_state, reason, actor, generation)
    SELECT sandbox_id, 'RUNNING', 'PAUSING', 'idle', 'scheduler', generation FROM claimed
)
SELECT sandbox_id, generation FROM claimed;

-- name: claim_one
WITH claimed AS (
    UPDATE sandbox_sessions
    SET state = 'PAUSING', generation = generation + 1, claimed_activity = last_activity,
        claimed_at = now(), pause_attempts = 0, updated_at = now()
    WHERE sandbox_id = $1 AND state = 'RUNNING'
    RETURNING sandbox_id, generation
), logged AS (
    INSERT INTO session_transitions (sandbox_id, from_state, to_state, reason, actor, generation)
    SELECT sandbox_id, 'RUNNING', 'PAUSING', $2, $3, generation FROM claimed
)
SELECT sandbox_id, generation FROM claimed;

-- name: renew_expired_leases
WITH stale AS (
    SELECT sandbox_id FROM sandbox_sessions
    WHERE state = 'PAUSING' AND claimed_at < now() - make_interval(secs => $1)
    ORDER BY claimed_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
UPDATE sandbox_sessions AS s SET claimed_at = now(), updated_at = now()
FROM stale WHERE s.sandbox_id = stale.sandbox_id
RETURNING s.sandbox_id, s.generation;

-- name: expire_paused
WITH old AS (
    SELECT sandbox_id FROM sandbox_sessions
    WHERE state = 'PAUSED' AND paused_at < now() - make_interval(days => $1)
    LIMIT $2
    FOR UPDATE SKIP LOCKED
), expired AS (
    UPDATE sandbox_sessions AS s SET state = 'EXPIRED', expired_at = now(), updated_at = now()
    FROM old WHERE s.sandbox_id = old.sandbox_id
    RETURNING s.sandbox_id, s.generation
), logged AS (
    INSERT INTO session_transitions (sandbox_id, from_state, to_state, reason, actor, generation)
    SELECT sandbox_id, 'PAUSED', 'EXPIRED', 'retention', 'scheduler', generation FROM expired
)
SELECT count(*) FROM expired;

-- name: command_backed
SELECT 1 FROM sandbox_sessions WHERE sandbox_id = $1 AND state = 'PAUSING' AND generation = $2;

-- name: finish_pause
-- The compare-and-set that closes a pause: only a row still PAUSING with the
-- command's generation moves, so an activity during the E2B call wins.
WITH moved AS (
    UPDATE sandbox_sessions
    SET state = $3,
        paused_at = CASE WHEN $3 = 'PAUSED' THEN now() ELSE paused_at END,
        killed_at = CASE WHEN $3 = 'KILLED' THEN now() ELSE killed_at END,
        retry_after = $5,
        pause_due_at = CASE WHEN $3 = 'RUNNING' THEN GREATEST(pause_due_at, $6) ELSE pause_due_at END,
        claimed_activity = NULL,
        last_error = $4,
        pause_attempts = $7,
        updated_at = now()
    WHERE sandbox_id = $1 AND state = 'PAUSING' AND generation = $2
    RETURNING sandbox_id, generation
), logged AS (
    INSERT INTO session_transitions (sandbox_id, from_state, to_state, reason, actor, generation)
    SELECT sandbox_id, 'PAUSING', $3, $8, 'worker', generation FROM moved
)
SELECT count(*) FROM moved;

-- name: record_attempt
UPDATE sandbox_sessions SET pause_attempts = $3, last_error = $4, updated_at = now()
WHERE sandbox_id = $1 AND state = 'PAUSING' AND generation = $2;

-- name: keep_alive
-- A pending pause is cancelled too: the worker's compare-and-set then finds RUNNING.
WITH old AS (
    SELECT sandbox_id, state FROM sandbox_sessions WHERE sandbox_id = $1 FOR UPDATE
), kept AS (
    UPDATE sandbox_sessions AS s
    SET keep_alive_until = $2, pause_due_at = GREATEST(s.pause_due_at, $2),
        state = CASE WHEN s.state = 'PAUSING' THEN 'RUNNING' ELSE s.state END,
        claimed_activity = CASE WHEN s.state = 'PAUSING' THEN NULL ELSE s.claimed_activity END,
        updated_at = now()
    FROM old WHERE s.sandbox_id = old.sandbox_id
    RETURNING s.sandbox_id, s.state, s.generation, old.state AS old_state
), logged AS (
    INSERT INTO session_transitions (sandbox_id, from_state, to_state, reason, actor, generation)
    SELECT sandbox_id, old_state, state, 'keep_alive', 'cli', generation FROM kept
    WHERE old_state <> state
)
SELECT state FROM kept;

-- name: get_session
SELECT * FROM sandbox_sessions WHERE sandbox_id = $1;

-- name: session_transitions
SELECT from_state, to_state, reason, actor, generation, at
FROM session_transitions WHERE sandbox_id = $1 ORDER BY id;

-- name: list_sessions
SELECT * FROM sandbox_sessions
WHERE ($1::text IS NULL OR project_id = $1)
  AND ($2::text IS NULL OR user_id = $2)
  AND ($3::text IS NULL OR state = $3)
  AND ($4::float8 IS NULL OR last_activity < now() - make_interval(secs => $4))
ORDER BY last_activity
LIMIT $5;

-- name: count_by_state
SELECT state, count(*) AS n FROM sandbox_sessions GROUP BY state;

-- name: last_tick
SELECT * FROM scheduler_ticks ORDER BY tick_at DESC LIMIT 1;

-- name: transitions_since
SELECT to_state, reason, count(*) AS n FROM session_transitions
WHERE at >= now() - make_interval(secs => $1)
GROUP BY to_state, reason;

-- name: paused_seconds
-- Seconds spent PAUSED, from each transition into PAUSED to the next one out (or now).
SELECT coalesce(sum(extract(epoch FROM coalesce(next_at, now()) - at)), 0)::float8
FROM (
    SELECT to_state, at, lead(at) OVER (PARTITION BY sandbox_id ORDER BY id) AS next_at
    FROM session_transitions
) AS spans
WHERE to_state = 'PAUSED';

-- Every statement autopause runs, as named blocks: "-- name: <name>" starts one.
-- consumer/store.py loads them once and runs them by name.

-- name: lock_sessions
-- The columns the state machine reads (and metadata as JSON text, passed through).
SELECT sandbox_id, state, last_activity, pause_due_at, project_id, user_id, template,
       idle_timeout_s, metadata::text AS metadata, created_event_id, created_event_at, generation,
       claimed_activity, paused_at, killed_at, keep_alive_until, retry_after, last_arrived_at,
       resume_requested_at, attempt_id, dry_run_at
FROM sandbox_sessions
WHERE sandbox_id = ANY($1::text[])
ORDER BY sandbox_id
FOR UPDATE;

-- name: insert_sessions
INSERT INTO sandbox_sessions (
    sandbox_id, project_id, user_id, template, idle_timeout_s, metadata,
    created_event_id, created_event_at, state, last_activity, pause_due_at, killed_at,
    last_arrived_at)
SELECT * FROM unnest(
    $1::text[], $2::text[], $3::text[], $4::text[], $5::int[], $6::jsonb[],
    $7::uuid[], $8::timestamptz[], $9::text[], $10::timestamptz[], $11::timestamptz[],
    $12::timestamptz[], $13::timestamptz[])
ORDER BY 1
ON CONFLICT (sandbox_id) DO NOTHING
RETURNING sandbox_id;

-- name: update_sessions
UPDATE sandbox_sessions AS s SET
    project_id = u.project_id, user_id = u.user_id, template = u.template,
    idle_timeout_s = u.idle_timeout_s, metadata = u.metadata,
    created_event_id = u.created_event_id, created_event_at = u.created_event_at,
    state = u.state, last_activity = u.last_activity, pause_due_at = u.pause_due_at,
    killed_at = u.killed_at, last_arrived_at = u.last_arrived_at,
    resume_requested_at = u.resume_requested_at, dry_run_at = u.dry_run_at, updated_at = now()
FROM unnest(
    $1::text[], $2::text[], $3::text[], $4::text[], $5::int[], $6::jsonb[],
    $7::uuid[], $8::timestamptz[], $9::text[], $10::timestamptz[], $11::timestamptz[],
    $12::timestamptz[], $13::timestamptz[], $14::timestamptz[], $15::timestamptz[])
    AS u(sandbox_id, project_id, user_id, template, idle_timeout_s, metadata,
         created_event_id, created_event_at, state, last_activity, pause_due_at,
         killed_at, last_arrived_at, resume_requested_at, dry_run_at)
WHERE s.sandbox_id = u.sandbox_id;

-- name: insert_transitions
INSERT INTO session_transitions (sandbox_id, from_state, to_state, reason, actor, generation, detail)
SELECT * FROM unnest(
    $1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[], $7::jsonb[]);

-- name: begin_tick
-- Take the tick lease (free, expired, or already ours) and record the tick in
-- one statement: (leased, started). Leased but not started means another
-- replica already ran this scheduled time; the caller gives the lease back.
WITH lease AS (
    INSERT INTO run_leases (name, holder, until)
    VALUES ($1, $3, now() + make_interval(secs => $4))
    ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder, until = EXCLUDED.until
    WHERE run_leases.until <= now() OR run_leases.holder = EXCLUDED.holder
    RETURNING name
), tick AS (
    INSERT INTO scheduler_ticks (tick_at, replica)
    SELECT $2, $3 FROM lease
    ON CONFLICT (tick_at) DO NOTHING
    RETURNING tick_at
)
SELECT EXISTS (SELECT FROM lease) AS leased, EXISTS (SELECT FROM tick) AS started;

-- name: finish_tick
-- Record what the tick did and give the lease back, in one statement.
WITH done AS (
    UPDATE scheduler_ticks
    SET finished_at = clock_timestamp(), claimed = $2, republished = $3, expired = $4,
        skipped = $5, error = $6, detail = $7::jsonb
    WHERE tick_at = $1
)
DELETE FROM run_leases WHERE name = $8 AND holder = $9;

-- name: release_lease
DELETE FROM run_leases WHERE name = $1 AND holder = $2;

-- name: try_advisory_lock
SELECT pg_try_advisory_lock(hashtext($1));

-- name: advisory_unlock
SELECT pg_advisory_unlock(hashtext($1));

-- name: running_count
SELECT count(*) FROM sandbox_sessions WHERE state = 'RUNNING';

-- name: prune_ticks
-- Tick and reconcile records older than a day: the recent ones are for status and the audit.
WITH ticks AS (
    DELETE FROM scheduler_ticks WHERE tick_at < now() - interval '1 day'
)
DELETE FROM reconcile_runs WHERE run_at < now() - interval '1 day';

-- name: claim_idle
-- $2 is the ingest watermark: only a deadline that passed before every event
-- published up to then was committed is a deadline ingest can vouch for.
WITH due AS (
    SELECT sandbox_id FROM sandbox_sessions
    WHERE state = 'RUNNING' AND pause_due_at <= LEAST(now(), $2)
    ORDER BY pause_due_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE sandbox_sessions AS s
    SET state = 'PAUSING', generation = s.generation + 1, claimed_activity = s.last_activity,
        claimed_at = now(), pause_attempts = 0, attempt_id = NULL, attempt_until = NULL,
        resume_requested_at = NULL, updated_at = now()
    FROM due WHERE s.sandbox_id = due.sandbox_id
    RETURNING s.sandbox_id, s.generation
), logged AS (
    INSERT INTO session_transitions (sandbox_id, from_state, to_state, reason, actor, generation)
    SELECT sandbox_id, 'RUNNING', 'PAUSING', 'idle', 'scheduler', generation FROM claimed
)
SELECT sandbox_id, generation FROM claimed;

-- name: make_due
-- An operator asks for a pause: the row is due now, and the next tick claims it
-- through the same gate as any other (ingest must vouch that it is idle).
WITH due AS (
    UPDATE sandbox_sessions
    SET pause_due_at = now(), keep_alive_until = NULL, retry_after = NULL, dry_run_at = NULL,
        updated_at = now()
    WHERE sandbox_id = $1 AND state = 'RUNNING'
    RETURNING sandbox_id, generation
), logged AS (
    INSERT INTO session_transitions (sandbox_id, from_state, to_state, reason, actor, generation)
    SELECT sandbox_id, 'RUNNING', 'RUNNING', 'pause_requested', 'cli', generation FROM due
)
SELECT state FROM sandbox_sessions WHERE sandbox_id = $1;

-- name: renew_expired_leases
WITH stale AS (
    SELECT sandbox_id FROM sandbox_sessions
    WHERE state = 'PAUSING' AND claimed_at < now() - make_interval(secs => $1)
      AND (attempt_until IS NULL OR attempt_until <= now())
    ORDER BY claimed_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
UPDATE sandbox_sessions AS s SET claimed_at = now(), updated_at = now()
FROM stale WHERE s.sandbox_id = stale.sandbox_id
RETURNING s.sandbox_id, s.generation;

-- name: renew_leases_and_probe
-- The start of every tick in one round trip: the first batch of claims whose
-- lease ran out (renewed, to be sent again) and the first deadline of a RUNNING
-- row (through the partial idle index). A tick with nothing due ends here.
WITH stale AS (
    SELECT sandbox_id FROM sandbox_sessions
    WHERE state = 'PAUSING' AND claimed_at < now() - make_interval(secs => $1)
      AND (attempt_until IS NULL OR attempt_until <= now())
    ORDER BY claimed_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
), renewed AS (
    UPDATE sandbox_sessions AS s SET claimed_at = now(), updated_at = now()
    FROM stale WHERE s.sandbox_id = stale.sandbox_id
    RETURNING s.sandbox_id, s.generation
)
SELECT now() AS now,
       (SELECT min(pause_due_at) FROM sandbox_sessions WHERE state = 'RUNNING') AS due,
       coalesce(array_agg(sandbox_id), '{}') AS sandbox_ids,
       coalesce(array_agg(generation), '{}') AS generations
FROM renewed;

-- name: expire_paused
WITH old AS (
    SELECT sandbox_id FROM sandbox_sessions
    WHERE state = 'PAUSED' AND paused_at < now() - make_interval(secs => $1::float8 * 86400)
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

-- name: release_claims
-- Claims whose commands could not be published go back to RUNNING at once,
-- with the deadline they had (a claim does not move it).
WITH released AS (
    UPDATE sandbox_sessions AS s SET state = 'RUNNING', updated_at = now()
    FROM unnest($1::text[], $2::bigint[]) AS c(sandbox_id, generation)
    WHERE s.sandbox_id = c.sandbox_id AND s.generation = c.generation
      AND s.state = 'PAUSING' AND s.attempt_id IS NULL
    RETURNING s.sandbox_id, s.generation
), logged AS (
    INSERT INTO session_transitions (sandbox_id, from_state, to_state, reason, actor, generation)
    SELECT sandbox_id, 'PAUSING', 'RUNNING', $3, 'scheduler', generation FROM released
)
SELECT count(*) FROM released;

-- name: unpark_dry_run
-- Rows a dry run parked become due again, by the rule of state.pause_due: the
-- timeout runs from the later of the newest activity and the newest arrival.
WITH parked AS (
    SELECT sandbox_id FROM sandbox_sessions
    WHERE dry_run_at IS NOT NULL AND state = 'RUNNING'
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
UPDATE sandbox_sessions AS s
SET dry_run_at = NULL,
    pause_due_at = GREATEST(
        GREATEST(s.last_activity, s.last_arrived_at) + make_interval(secs => coalesce(s.idle_timeout_s, $1)),
        s.keep_alive_until, s.retry_after),
    updated_at = now()
FROM parked WHERE s.sandbox_id = parked.sandbox_id;

-- name: commands_backed
-- Which pause commands their rows back (PAUSING, same generation), in order,
-- with E2B's end of life for the sandbox as the last listing saw it.
SELECT s.sandbox_id IS NOT NULL AS backed, s.e2b_end_at, s.e2b_seen_at
FROM unnest($1::text[], $2::bigint[]) WITH ORDINALITY AS c(sandbox_id, generation, n)
LEFT JOIN sandbox_sessions AS s
    ON s.sandbox_id = c.sandbox_id AND s.generation = c.generation AND s.state = 'PAUSING'
ORDER BY c.n;

-- name: begin_attempts
-- The compare-and-set before E2B is called, for a batch of commands (one per
-- sandbox): a row must back its command (PAUSING, same generation) and no
-- other attempt may hold it. The winner holds it for $5 seconds, longer than
-- its calls can take. Answers in the order asked.
WITH want AS (
    SELECT * FROM unnest($1::text[], $2::bigint[], $3::uuid[], $4::int[]) WITH ORDINALITY
        AS w(sandbox_id, generation, attempt_id, attempts, n)
), cur AS (
    SELECT s.sandbox_id, s.state, s.generation, s.attempt_until FROM sandbox_sessions AS s
    WHERE s.sandbox_id IN (SELECT sandbox_id FROM want)
    ORDER BY s.sandbox_id
    FOR UPDATE
), took AS (
    UPDATE sandbox_sessions AS s
    SET attempt_id = w.attempt_id, attempt_until = now() + make_interval(secs => $5),
        pause_attempts = w.attempts, updated_at = now()
    FROM want AS w, cur AS c
    WHERE s.sandbox_id = w.sandbox_id AND c.sandbox_id = w.sandbox_id
      AND c.state = 'PAUSING' AND c.generation = w.generation
      AND (c.attempt_until IS NULL OR c.attempt_until <= now())
    RETURNING s.sandbox_id, s.claimed_activity, s.idle_timeout_s
)
SELECT t.sandbox_id IS NOT NULL AS taken,
       coalesce(c.state = 'PAUSING' AND c.generation = w.generation, false) AS backed,
       greatest(0, extract(epoch FROM c.attempt_until - now()))::float8 AS held_for,
       t.claimed_activity, t.idle_timeout_s
FROM want AS w
LEFT JOIN cur AS c ON c.sandbox_id = w.sandbox_id
LEFT JOIN took AS t ON t.sandbox_id = w.sandbox_id
ORDER BY w.n;

-- name: renew_attempt
-- An attempt that waited long for the rate limiter renews its hold before calling
-- E2B; a hold that already ran out may be another attempt's now.
UPDATE sandbox_sessions SET attempt_until = now() + make_interval(secs => $4)
WHERE sandbox_id = $1 AND generation = $2 AND attempt_id = $3 AND state = 'PAUSING'
  AND attempt_until > now()
RETURNING 1;

-- name: record_attempt
-- A retryable failure: the attempt's hold ends now, so a copy of the command may try.
UPDATE sandbox_sessions
SET pause_attempts = $4, last_error = $5, attempt_until = now(), updated_at = now()
WHERE sandbox_id = $1 AND state = 'PAUSING' AND generation = $2 AND attempt_id = $3;

-- name: finish_pauses
-- The compare-and-sets that close pauses, for a batch (one per sandbox): only a
-- row still PAUSING with its command's generation and attempt moves. For the
-- others the answer tells where the row went (activity during the call sends
-- it to RUNNING). Answers in the order asked.
WITH done AS (
    SELECT * FROM unnest(
        $1::text[], $2::bigint[], $3::uuid[], $4::text[], $5::text[], $6::timestamptz[],
        $7::timestamptz[], $8::timestamptz[], $9::int[], $10::timestamptz[], $11::float8[],
        $12::bool[], $13::text[]) WITH ORDINALITY
        AS d(sandbox_id, generation, attempt_id, to_state, error, retry_after, due_at, dry_run_at,
             attempts, end_at, lifetime_left_s, check_later, reason, n)
), cur AS (
    SELECT s.sandbox_id, s.state, s.generation FROM sandbox_sessions AS s
    WHERE s.sandbox_id IN (SELECT sandbox_id FROM done)
    ORDER BY s.sandbox_id
    FOR UPDATE
), moved AS (
    UPDATE sandbox_sessions AS s
    SET state = d.to_state,
        paused_at = CASE WHEN d.to_state = 'PAUSED' THEN now() ELSE s.paused_at END,
        killed_at = CASE WHEN d.to_state = 'KILLED' THEN now() ELSE s.killed_at END,
        retry_after = d.retry_after,
        pause_due_at = CASE WHEN d.to_state = 'RUNNING' THEN GREATEST(s.pause_due_at, d.due_at)
                            ELSE s.pause_due_at END,
        dry_run_at = d.dry_run_at,
        last_error = d.error,
        pause_attempts = d.attempts,
        e2b_end_at = coalesce(d.end_at, s.e2b_end_at),
        lifetime_left_s = d.lifetime_left_s,
        resume_requested_at = CASE WHEN d.check_later THEN now() ELSE NULL END,
        attempt_until = NULL,
        updated_at = now()
    FROM done AS d, cur AS c
    WHERE s.sandbox_id = d.sandbox_id AND c.sandbox_id = d.sandbox_id
      AND c.state = 'PAUSING' AND c.generation = d.generation AND s.attempt_id = d.attempt_id
    RETURNING s.sandbox_id, s.generation, d.to_state, d.reason
), logged AS (
    INSERT INTO session_transitions (sandbox_id, from_state, to_state, reason, actor, generation)
    SELECT sandbox_id, 'PAUSING', to_state, reason, 'worker', generation FROM moved
)
SELECT m.sandbox_id IS NOT NULL AS moved, c.state
FROM done AS d
LEFT JOIN cur AS c ON c.sandbox_id = d.sandbox_id
LEFT JOIN moved AS m ON m.sandbox_id = d.sandbox_id
ORDER BY d.n;

-- name: take_repairs
-- Rows whose sandbox may have been paused while in use, for this worker to check.
WITH due AS (
    SELECT sandbox_id FROM sandbox_sessions
    WHERE resume_requested_at IS NOT NULL AND state = 'RUNNING'
      AND (attempt_until IS NULL OR attempt_until <= now())
    ORDER BY resume_requested_at
    LIMIT $3
    FOR UPDATE SKIP LOCKED
)
UPDATE sandbox_sessions AS s
SET attempt_id = $1, attempt_until = now() + make_interval(secs => $2), updated_at = now()
FROM due WHERE s.sandbox_id = due.sandbox_id
RETURNING s.sandbox_id, s.last_activity, s.claimed_activity, s.lifetime_left_s;

-- name: take_own_repair
-- The worker whose pause raced with activity repairs it at once, under the
-- attempt it already holds.
UPDATE sandbox_sessions
SET attempt_until = now() + make_interval(secs => $3), updated_at = now()
WHERE sandbox_id = $1 AND attempt_id = $2 AND state = 'RUNNING' AND resume_requested_at IS NOT NULL
RETURNING sandbox_id, last_activity, claimed_activity, lifetime_left_s;

-- name: finish_repair
-- $3: 'paused_in_use' (resumed it after our pause), 'resumed_for_use' (resumed it after
-- a pause E2B made), 'running' (nothing to do) or 'gone'.
WITH done AS (
    UPDATE sandbox_sessions AS s
    SET resume_requested_at = NULL, attempt_id = NULL, attempt_until = NULL,
        state = CASE WHEN $3 = 'gone' THEN 'KILLED' ELSE s.state END,
        killed_at = CASE WHEN $3 = 'gone' THEN now() ELSE s.killed_at END,
        updated_at = now()
    WHERE s.sandbox_id = $1 AND s.attempt_id = $2 AND s.state = 'RUNNING'
    RETURNING s.sandbox_id, s.generation
), logged AS (
    INSERT INTO session_transitions (sandbox_id, from_state, to_state, reason, actor, generation, detail)
    SELECT sandbox_id, 'RUNNING', CASE WHEN $3 = 'gone' THEN 'KILLED' ELSE 'RUNNING' END, $3, 'worker',
           generation, $4::jsonb
    FROM done WHERE $3 <> 'running'
)
SELECT count(*) FROM done;

-- name: delay_repair
UPDATE sandbox_sessions SET attempt_until = now() + make_interval(secs => $3), updated_at = now()
WHERE sandbox_id = $1 AND attempt_id = $2;

-- name: pending_repairs
SELECT count(*) FROM sandbox_sessions WHERE resume_requested_at IS NOT NULL AND state = 'RUNNING';

-- name: beat_ingest
INSERT INTO ingest_replicas (replica, beat_at, held, held_redelivered) VALUES ($1, now(), $2, $3)
ON CONFLICT (replica) DO UPDATE SET beat_at = now(), held = $2, held_redelivered = $3
RETURNING beat_at;

-- name: advance_watermark
INSERT INTO ingest_replicas (replica, watermark) VALUES ($1, $2)
ON CONFLICT (replica) DO UPDATE
SET watermark = GREATEST(ingest_replicas.watermark, EXCLUDED.watermark);

-- name: forget_ingest
DELETE FROM ingest_replicas WHERE replica = $1;

-- name: ingest_replicas
SELECT n.now, r.replica, r.beat_at, r.held, r.held_redelivered, r.watermark
FROM (SELECT now() AS now) AS n LEFT JOIN ingest_replicas AS r ON true;

-- name: retire_ingest
-- A replica silent this long is gone; the broker has returned what it held.
DELETE FROM ingest_replicas WHERE beat_at < now() - make_interval(secs => $1);

-- name: keep_alive
-- A pending pause is cancelled too: the worker's compare-and-set then finds RUNNING.
WITH old AS (
    SELECT sandbox_id, state FROM sandbox_sessions WHERE sandbox_id = $1 FOR UPDATE
), kept AS (
    UPDATE sandbox_sessions AS s
    SET keep_alive_until = $2, pause_due_at = GREATEST(s.pause_due_at, $2),
        state = CASE WHEN s.state = 'PAUSING' THEN 'RUNNING' ELSE s.state END,
        -- a pause call may be under way: the worker then resumes the sandbox
        resume_requested_at = CASE WHEN s.state = 'PAUSING' AND s.attempt_id IS NOT NULL THEN now()
                                   ELSE s.resume_requested_at END,
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
SELECT from_state, to_state, reason, actor, generation, at, detail
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

-- name: paused_usage
-- Seconds spent PAUSED, from each transition into PAUSED to the next one out (or
-- now), and what they would have cost running, by each sandbox's size ($1 vCPUs
-- and $2 MiB where unknown; $3 USD per vCPU-second, $4 USD per GiB-second).
SELECT coalesce(sum(spans.seconds), 0)::float8 AS seconds,
       coalesce(sum(spans.seconds * (coalesce(s.cpu_count, $1::int) * $3::float8
                                     + coalesce(s.memory_mb, $2::int) / 1024.0 * $4::float8)), 0)::float8 AS usd
FROM (
    SELECT sandbox_id, extract(epoch FROM coalesce(next_at, now()) - at) AS seconds
    FROM (
        SELECT sandbox_id, to_state, at, lead(at) OVER (PARTITION BY sandbox_id ORDER BY id) AS next_at
        FROM session_transitions
    ) AS t
    WHERE to_state = 'PAUSED'
) AS spans
LEFT JOIN sandbox_sessions AS s ON s.sandbox_id = spans.sandbox_id;

-- reconcile: what E2B lists against the table ($listed_at: when the listing
-- started; a row written since is newer than the listing and left alone)

-- name: start_reconcile
INSERT INTO reconcile_runs (run_at, replica) VALUES ($1, $2)
ON CONFLICT (run_at) DO NOTHING
RETURNING run_at;

-- name: finish_reconcile
UPDATE reconcile_runs
SET finished_at = clock_timestamp(), listed = $2, requests = $3, changes = $4::jsonb, error = $5
WHERE run_at = $1;

-- name: reconcile_view
-- The live rows E2B listed, and the live rows it did not (candidates for gone).
SELECT s.sandbox_id, s.state, s.cpu_count, s.memory_mb, s.e2b_end_at,
       l.sandbox_id IS NOT NULL AS listed,
       s.updated_at < $2 AND s.created_at < $2
           AND (s.attempt_until IS NULL OR s.attempt_until <= now())
           AND s.resume_requested_at IS NULL AS settled
FROM sandbox_sessions AS s
LEFT JOIN unnest($1::text[]) AS l(sandbox_id) ON l.sandbox_id = s.sandbox_id
WHERE s.state IN ('RUNNING', 'PAUSING', 'PAUSED');

-- name: known_sandboxes
SELECT sandbox_id FROM sandbox_sessions WHERE sandbox_id = ANY($1::text[]);

-- name: resumed_outside
-- E2B runs a sandbox the table calls PAUSED: its idle timeout counts from now.
WITH moved AS (
    UPDATE sandbox_sessions AS s
    SET state = 'RUNNING', last_arrived_at = now(), dry_run_at = NULL,
        pause_due_at = GREATEST(now() + make_interval(secs => coalesce(s.idle_timeout_s, $3)),
                                s.keep_alive_until, s.retry_after),
        updated_at = now()
    WHERE s.sandbox_id = ANY($1::text[]) AND s.state = 'PAUSED' AND s.updated_at < $2
    RETURNING s.sandbox_id, s.generation
), logged AS (
    INSERT INTO session_transitions (sandbox_id, from_state, to_state, reason, actor, generation)
    SELECT sandbox_id, 'PAUSED', 'RUNNING', 'resumed_outside', 'reconcile', generation FROM moved
)
SELECT sandbox_id FROM moved;

-- name: paused_outside
-- E2B holds paused a sandbox the table calls RUNNING: no pause is to be sent.
-- No claim of ours saw it (claimed_activity NULL): later activity resumes it all
-- the same, and its repair is not counted as a pause of ours.
WITH moved AS (
    UPDATE sandbox_sessions AS s
    SET state = 'PAUSED', paused_at = now(), claimed_activity = NULL, updated_at = now()
    WHERE s.sandbox_id = ANY($1::text[]) AND s.state = 'RUNNING' AND s.updated_at < $2
      AND s.resume_requested_at IS NULL
    RETURNING s.sandbox_id, s.generation
), logged AS (
    INSERT INTO session_transitions (sandbox_id, from_state, to_state, reason, actor, generation)
    SELECT sandbox_id, 'RUNNING', 'PAUSED', 'paused_outside', 'reconcile', generation FROM moved
)
SELECT sandbox_id FROM moved;

-- name: gone
-- E2B's get_info answered 404: the sandbox no longer exists.
WITH moved AS (
    UPDATE sandbox_sessions AS s
    SET state = 'KILLED', killed_at = now(), resume_requested_at = NULL, updated_at = now()
    WHERE s.sandbox_id = $1 AND s.state IN ('RUNNING', 'PAUSING', 'PAUSED') AND s.updated_at < $2
      AND (s.attempt_until IS NULL OR s.attempt_until <= now())
    RETURNING s.sandbox_id, s.generation, s.state AS old_state
), logged AS (
    INSERT INTO session_transitions (sandbox_id, from_state, to_state, reason, actor, generation)
    SELECT sandbox_id, old_state, 'KILLED', 'gone', 'reconcile', generation FROM moved
)
SELECT count(*) FROM moved;

-- name: adopt
-- Running sandboxes in scope that no app announced: tracked from now.
WITH adopted AS (
    INSERT INTO sandbox_sessions (
        sandbox_id, metadata, state, last_activity, last_arrived_at, pause_due_at,
        cpu_count, memory_mb, e2b_end_at)
    SELECT u.sandbox_id, u.metadata, 'RUNNING', now(), now(), now() + make_interval(secs => $6),
           u.cpu_count, u.memory_mb, u.end_at
    FROM unnest($1::text[], $2::jsonb[], $3::int[], $4::int[], $5::timestamptz[])
        AS u(sandbox_id, metadata, cpu_count, memory_mb, end_at)
    ORDER BY 1
    ON CONFLICT (sandbox_id) DO NOTHING
    RETURNING sandbox_id
), logged AS (
    INSERT INTO session_transitions (sandbox_id, from_state, to_state, reason, actor, generation)
    SELECT sandbox_id, NULL, 'RUNNING', 'adopted', 'reconcile', 0 FROM adopted
)
SELECT sandbox_id FROM adopted;

-- name: record_sizes
-- What E2B says of each listed live sandbox's size and end of life, and when it
-- said so (a recent end of life spares the worker a get_info before its pause).
-- The rows are locked in sandbox-id order first, as ingest locks its batches:
-- in the listing's order the two could deadlock.
WITH locked AS (
    SELECT sandbox_id FROM sandbox_sessions
    WHERE sandbox_id = ANY($1::text[]) AND state IN ('RUNNING', 'PAUSING', 'PAUSED')
    ORDER BY sandbox_id
    FOR UPDATE
)
UPDATE sandbox_sessions AS s
SET cpu_count = u.cpu_count, memory_mb = u.memory_mb, e2b_end_at = u.end_at, e2b_seen_at = $5
FROM unnest($1::text[], $2::int[], $3::int[], $4::timestamptz[])
    AS u(sandbox_id, cpu_count, memory_mb, end_at)
WHERE s.sandbox_id = u.sandbox_id AND s.sandbox_id IN (SELECT sandbox_id FROM locked)
  AND s.state IN ('RUNNING', 'PAUSING', 'PAUSED');

-- name: db_now
SELECT now();

-- name: schema_migrated
-- Whether the schema holds autopause's tables. Operator commands check it
-- instead of migrating: a command that reads must never change the schema.
SELECT to_regclass(format('%I.autopause_migrations', $1::text)) IS NOT NULL;

-- name: applied_migrations
SELECT version FROM autopause_migrations ORDER BY version;

-- name: resume_by_operator
-- An operator resumed a PAUSED sandbox through E2B: the row runs again, with a
-- fresh deadline. The resume counts as an arrival (never as activity, which is
-- event time), so every rule that computes the deadline again (state.pause_due)
-- gives this one. Only the row read before the E2B call moves.
WITH cur AS (
    SELECT sandbox_id, state, generation FROM sandbox_sessions WHERE sandbox_id = $1 FOR UPDATE
), moved AS (
    UPDATE sandbox_sessions AS s
    SET state = 'RUNNING',
        last_arrived_at = GREATEST(s.last_arrived_at, now()),
        pause_due_at = GREATEST(
            s.last_activity + make_interval(secs => coalesce(s.idle_timeout_s, $3)),
            GREATEST(s.last_arrived_at, now()) + make_interval(secs => coalesce(s.idle_timeout_s, $3)),
            s.keep_alive_until, s.retry_after),
        resume_requested_at = NULL, dry_run_at = NULL, updated_at = now()
    FROM cur
    WHERE s.sandbox_id = cur.sandbox_id AND cur.state = 'PAUSED' AND cur.generation = $2
    RETURNING s.sandbox_id, s.generation, s.pause_due_at
), logged AS (
    INSERT INTO session_transitions (sandbox_id, from_state, to_state, reason, actor, generation)
    SELECT sandbox_id, 'PAUSED', 'RUNNING', 'resumed_by_operator', 'cli', generation FROM moved
)
SELECT EXISTS (SELECT 1 FROM moved) AS moved, cur.state, (SELECT pause_due_at FROM moved) AS pause_due_at
FROM cur;

-- name: gone_by_operator
-- E2B answered an operator's resume with 404: the sandbox no longer exists.
WITH cur AS (
    SELECT sandbox_id, state, generation FROM sandbox_sessions WHERE sandbox_id = $1 FOR UPDATE
), moved AS (
    UPDATE sandbox_sessions AS s
    SET state = 'KILLED', killed_at = coalesce(s.killed_at, now()), resume_requested_at = NULL,
        updated_at = now()
    FROM cur
    WHERE s.sandbox_id = cur.sandbox_id AND cur.state = 'PAUSED' AND cur.generation = $2
    RETURNING s.sandbox_id, s.generation
), logged AS (
    INSERT INTO session_transitions (sandbox_id, from_state, to_state, reason, actor, generation)
    SELECT sandbox_id, 'PAUSED', 'KILLED', 'gone', 'cli', generation FROM moved
)
SELECT EXISTS (SELECT 1 FROM moved) AS moved, cur.state FROM cur;

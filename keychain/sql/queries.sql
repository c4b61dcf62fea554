-- Every statement the keychain runs, by name. Loaded once by keychain/queries.py; asyncpg prepares each on first use.
-- Statements run with search_path = the keychain schema.
--
-- LOCK ORDER. Every transaction that writes takes its locks in this order, and within a class in the order given,
-- and never waits for a lock of an earlier class while it holds one of a later class. Two writers can then never wait
-- for each other in a cycle, so PostgreSQL never has to kill one of them as a deadlock victim.
--   1. an applied notice             keychain_applied_notice, one per invalidation (record_notice)
--   2. secrets' state rows           keychain_secret_state, by secret COLLATE "C" (ensure_secret_states,
--                                    lock_secret_states FOR SHARE; bump_generations, bump_all_generations exclusive)
--   3. executions' fence locks       advisory, by execution id (lock_executions_shared; lock_execution exclusive)
--   4. keychain rows                 by identity: credential_name COLLATE "C", scope_type, scope_id. Every statement
--                                    that writes rows takes their locks in a CTE ... ORDER BY identity FOR UPDATE first
--                                    (an INSERT ... ON CONFLICT inserts in that order), so the rows it may have to
--                                    wait for are taken in the same order by every writer. A worker target's rows in
--                                    its own store (by its own key) are taken here too, after ours
--   5. the rows beside a row          keychain_latest_held (by key), keychain_fetch_failure (by ref), keychain_fetched
--                                    (by ref), keychain_copy (by target, key): written after the rows, in key order
-- A secret is known by its identity everywhere (refs.SecretIdentity: `projects/NUMBER[/locations/L]/secrets/S`, or
-- `projects/*/...` while the project's number is unknown): the `secret` columns, and the `secret` of every `sources`
-- element. Statements that reach a secret "in any project" take its path ($N: `secrets/S`, `locations/L/secrets/S`).
-- A transaction that applies an outbox entry (keychain/outbox.py) takes that entry first (SKIP LOCKED: it never waits
-- for it), then only a target's rows (class 4) and the rows beside them (class 5): never a class 2 lock.
-- Outside the order, because they never wait: the sweep's statements (FOR UPDATE SKIP LOCKED: a row someone else
-- holds is left for the next sweep) and the fetch locks (pg_try_advisory_lock on the lock connection). Statements
-- run alone (take_call, record_fetch, record_failure, forget_failure, mark_checked, learn_project_number) lock one
-- row and hold nothing else.

-- name: get_entry
-- The worker read, one plain statement (no row lock, no new row version), hit or not: the row of this identity with
-- what its hit bookkeeping needs, and why it may not be served (`refused`: expired, stale, failed with its error_code;
-- NULL for a hit), so that a miss needs no second round trip to say why. The hit is counted in memory and written
-- by count_reads (keychain/reads.py). A row invalidated by a transaction that committed before this read began is
-- not served.
SELECT k.id, k.key_id, k.data, k.write_id, k.reads_since_write, k.updated_at,
       CASE WHEN k.expires_at <= now() THEN 'expired' WHEN k.state = 'ready' THEN NULL ELSE k.state END AS refused,
       k.error_code
FROM keychain k
WHERE k.credential_name = $1 AND k.scope_type = $2 AND k.scope_id = $3;

-- name: get_entry_from
-- The same read for a caller that names the secret it wants ($4: a `sources` containment pattern): a row holding
-- another secret under this name (a global name repointed by another execution) is not served.
SELECT k.id, k.key_id, k.data, k.write_id, k.reads_since_write, k.updated_at,
       CASE WHEN k.expires_at <= now() THEN 'expired' WHEN k.state <> 'ready' THEN k.state
            WHEN NOT k.sources @> $4::jsonb THEN 'other_source' END AS refused,
       k.error_code
FROM keychain k
WHERE k.credential_name = $1 AND k.scope_type = $2 AND k.scope_id = $3;

-- name: count_reads
-- The hits one process served since its last count, one element per row: `access_count` and `accessed_at` as the
-- seed kept them (the last read's moment, given as its age so that no two clocks are compared), and
-- `reads_since_write` for reads of the value the row still holds (a row written again meanwhile counts only the
-- reads of its new write).
WITH r AS (
    SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::int[], $4::int[], $5::float8[])
        AS r(id, write_id, reads_of_write, reads, age_seconds)
), locked AS (  -- lock order 4
    SELECT k.id FROM keychain k WHERE k.id IN (SELECT id FROM r)
    ORDER BY k.credential_name COLLATE "C", k.scope_type COLLATE "C", k.scope_id COLLATE "C"
    FOR UPDATE
)
UPDATE keychain k
SET access_count = k.access_count + r.reads,
    accessed_at = greatest(k.accessed_at, now() - make_interval(secs => r.age_seconds)),
    reads_since_write = k.reads_since_write
        + CASE WHEN k.write_id IS NOT DISTINCT FROM r.write_id THEN r.reads_of_write ELSE 0 END
FROM r JOIN locked USING (id)
WHERE k.id = r.id;

-- name: durable_commit
-- Every write's transaction: this commit is flushed to disk (the pool commits asynchronously for read bookkeeping).
SELECT set_config('synchronous_commit', 'on', true);

-- name: put_entries
-- Store entries (one element per row in each array, one element per identity): ready ones with their ciphertext,
-- failed ones with an error code. A repeated delivery overwrites with the same outcome. Rows of finished executions are never written
-- (the caller holds the executions' fence locks, see lock_executions_shared). Ready rows that hold a secret through
-- `latest` are entered in the reconciliation summary (keychain_latest_held, see migration 0006) in the same statement.
WITH written AS (
INSERT INTO keychain AS k (credential_name, credential_type, scope_type, cache_type, execution_id, session_id,
                           state, error_code, key_id, data, write_id, sources, ttl_seconds, expires_at)
SELECT e.credential_name, e.credential_type, e.scope_type, e.cache_type, e.execution_id, e.session_id,
       e.state, e.error_code, e.key_id, e.data, e.write_id, e.sources, e.ttl_seconds,
       now() + make_interval(secs => e.ttl_seconds)
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::text[],
            $7::text[], $8::text[], $9::text[], $10::bytea[], $11::bigint[], $12::jsonb[], $13::int[])
     AS e(credential_name, credential_type, scope_type, cache_type, execution_id, session_id,
          state, error_code, key_id, data, write_id, sources, ttl_seconds)
WHERE e.execution_id IS NULL
   OR NOT EXISTS (SELECT 1 FROM keychain_finished_execution f WHERE f.execution_id = e.execution_id)
-- Lock order 4: rows are inserted (or their existing row locked) in identity order.
ORDER BY e.credential_name COLLATE "C", e.scope_type COLLATE "C",
         CASE e.scope_type WHEN 'execution' THEN e.execution_id::text WHEN 'session' THEN e.session_id ELSE '' END
         COLLATE "C"
ON CONFLICT ON CONSTRAINT keychain_identity DO UPDATE
SET credential_type = excluded.credential_type, cache_type = excluded.cache_type,
    state = excluded.state, error_code = excluded.error_code, key_id = excluded.key_id, data = excluded.data,
    write_id = excluded.write_id, sources = excluded.sources, ttl_seconds = excluded.ttl_seconds, expires_at = excluded.expires_at,
    updated_at = now(), reads_since_write = 0
RETURNING k.state, k.sources, k.expires_at
), held AS (
    SELECT keychain_hold_latest(array_agg(w.sources), array_agg(w.expires_at)) FROM written w WHERE w.state = 'ready'
)
SELECT (SELECT count(*) FROM written) FROM held;

-- name: lock_executions_shared
-- Writers of execution-scoped rows hold each execution's fence lock shared; finishing an execution takes it
-- exclusively, so a write and a finish of one execution never interleave. Sorted, so lockers never deadlock.
SELECT pg_advisory_xact_lock_shared(hashtextextended('keychain.execution:' || id::text, 0))
FROM (SELECT DISTINCT unnest($1::bigint[]) AS id ORDER BY 1) ids;

-- name: lock_execution
SELECT pg_advisory_xact_lock(hashtextextended('keychain.execution:' || $1::bigint::text, 0));

-- name: finish_execution
-- Fence the execution, then delete its rows; returns how many rows were deleted.
WITH fence AS (
    INSERT INTO keychain_finished_execution (execution_id) VALUES ($1) ON CONFLICT DO NOTHING
), doomed AS (  -- lock order 4
    SELECT id FROM keychain WHERE scope_type = 'execution' AND execution_id = $1
    ORDER BY credential_name COLLATE "C" FOR UPDATE
), purged AS (
    DELETE FROM keychain k USING doomed WHERE k.id = doomed.id RETURNING 1
)
SELECT count(*) FROM purged;

-- name: existing_rows
-- The rows these identities already have: whether each holds a ready value that outlives $4 seconds (so a
-- redelivered start event or an already-warm global credential costs no Secret Manager call), and where its value
-- came from (so a warm that points a name at another secret, project or version is seen: model.held_of).
SELECT k.credential_name, k.scope_type, k.scope_id,
       k.state = 'ready' AND k.expires_at > now() + make_interval(secs => $4) AS ready, k.sources
FROM keychain k
JOIN unnest($1::text[], $2::text[], $3::text[]) AS w(credential_name, scope_type, scope_id)
  USING (credential_name, scope_type, scope_id);

-- name: globals_to_refresh
-- Keep warm: global rows read since they were written whose expiry is near ($1 seconds); their sources say
-- what to fetch again.
SELECT credential_name, cache_type, sources FROM keychain
WHERE scope_type = 'global' AND state = 'ready' AND sources <> '[]'
  AND expires_at < now() + make_interval(secs => $1) AND accessed_at > updated_at
ORDER BY expires_at LIMIT $2;

-- name: invalidate_credential
WITH locked AS (  -- lock order 4
    SELECT id FROM keychain WHERE credential_name = $1 AND state = 'ready'
    ORDER BY credential_name COLLATE "C", scope_type COLLATE "C", scope_id COLLATE "C" FOR UPDATE
)
UPDATE keychain k SET state = 'stale', updated_at = now() FROM locked WHERE k.id = locked.id;

-- name: invalidate_execution
WITH locked AS (  -- lock order 4
    SELECT id FROM keychain WHERE scope_type = 'execution' AND execution_id = $1 AND state = 'ready'
    ORDER BY credential_name COLLATE "C", scope_type COLLATE "C", scope_id COLLATE "C" FOR UPDATE
)
UPDATE keychain k SET state = 'stale', updated_at = now() FROM locked WHERE k.id = locked.id;

-- name: invalidate_all
WITH locked AS (  -- lock order 4
    SELECT id FROM keychain WHERE state = 'ready'
    ORDER BY credential_name COLLATE "C", scope_type COLLATE "C", scope_id COLLATE "C" FOR UPDATE
)
UPDATE keychain k SET state = 'stale', updated_at = now() FROM locked WHERE k.id = locked.id;

-- name: sweep_expired
-- One bounded batch; SKIP LOCKED so a sweep never waits on, or blocks, rows being written.
WITH doomed AS (
    SELECT id FROM keychain WHERE expires_at <= now()
    ORDER BY expires_at LIMIT $1
    FOR UPDATE SKIP LOCKED
)
DELETE FROM keychain k USING doomed WHERE k.id = doomed.id;

-- name: sweep_shared_fetches
WITH doomed AS (SELECT ref FROM keychain_fetched WHERE fetched_at <= now() - make_interval(secs => $1)
                FOR UPDATE SKIP LOCKED)
DELETE FROM keychain_fetched f USING doomed WHERE f.ref = doomed.ref;

-- name: try_lock_fetch
-- Cross-process single flight for one reference: a session lock on the fetcher's lock connection, held while it
-- calls Secret Manager (keychain/fetcher.py); false when another process holds it.
SELECT pg_try_advisory_lock(hashtextextended('keychain.fetch:' || $1, 0));

-- name: unlock_fetch
SELECT pg_advisory_unlock(hashtextextended('keychain.fetch:' || $1, 0));

-- name: take_call
-- Take one call from the shared Secret Manager budget ($1 calls per minute, also the bucket's size: the burst).
-- Returns how long the caller waits before calling: 0 while tokens remain, else its place in the debt.
INSERT INTO keychain_call_budget AS b (name, tokens, updated_at) VALUES ('secret_manager', $1 - 1, clock_timestamp())
ON CONFLICT (name) DO UPDATE
SET tokens = least($1, b.tokens + extract(epoch FROM clock_timestamp() - b.updated_at) * $1 / 60.0) - 1,
    updated_at = clock_timestamp()
RETURNING greatest(0.0, -b.tokens) * 60.0 / $1 AS wait_seconds;

-- name: shared_fetch
-- The rotation generation now of the secret ($3: the identity the caller's fetch is fenced on), and the version of
-- reference $1 that any process recorded within $2 seconds, if the secret it was fenced on has not been invalidated
-- since (NULL columns when there is none). The recorder may have fenced on another spelling of the same secret (the
-- project unknown to it, known to the caller, or the reverse): an invalidation of a known project's secret moves the
-- unknown project's generation on too, so either way a value recorded before an invalidation is never taken after it.
SELECT coalesce(s.generation, 0) AS generation, f.version_name, f.key_id, f.data, f.write_id
FROM (VALUES (1)) AS one (x)
LEFT JOIN keychain_secret_state s ON s.secret = $3
LEFT JOIN (keychain_fetched f LEFT JOIN keychain_secret_state recorded ON recorded.secret = f.secret)
       ON f.ref = $1 AND f.fetched_at > now() - make_interval(secs => $2)
      AND f.generation = coalesce(recorded.generation, 0);

-- name: record_fetch
-- A version fetched, for every process, and a NOTIFY that wakes the processes waiting for it. Not a durable commit:
-- a value lost in a crash is fetched again.
WITH recorded AS (
    INSERT INTO keychain_fetched (ref, secret, generation, version_name, key_id, data, write_id, fetched_at)
    VALUES ($1, $2, $3, $4, $5, $6, $7, now())
    ON CONFLICT (ref) DO UPDATE
    SET secret = excluded.secret, generation = excluded.generation, version_name = excluded.version_name,
        key_id = excluded.key_id, data = excluded.data, write_id = excluded.write_id, fetched_at = excluded.fetched_at
    RETURNING ref
)
SELECT pg_notify('keychain_fetched', ref) FROM recorded;

-- name: forget_fetches
-- The shared fetches of these secrets ($1: identities), or of the secret in any project ($2: its path; NULL: none).
WITH doomed AS (SELECT ref FROM keychain_fetched
                WHERE secret = ANY($1::text[]) OR regexp_replace(secret, '^projects/[^/]+/', '') = $2
                ORDER BY ref COLLATE "C" FOR UPDATE)  -- order 5
DELETE FROM keychain_fetched f USING doomed WHERE f.ref = doomed.ref;

-- name: forget_every_fetch
WITH doomed AS (SELECT ref FROM keychain_fetched ORDER BY ref COLLATE "C" FOR UPDATE)  -- order 5
DELETE FROM keychain_fetched f USING doomed WHERE f.ref = doomed.ref;

-- name: sweep_failures
WITH doomed AS (SELECT secret_ref FROM keychain_fetch_failure WHERE retry_at <= now() - interval '1 day'
                FOR UPDATE SKIP LOCKED)
DELETE FROM keychain_fetch_failure f USING doomed WHERE f.secret_ref = doomed.secret_ref;

-- name: sweep_fences
-- A fence must outlive any start event that can still arrive for its execution; $1 = retention in seconds.
WITH doomed AS (SELECT execution_id FROM keychain_finished_execution
                WHERE finished_at < now() - make_interval(secs => $1) FOR UPDATE SKIP LOCKED)
DELETE FROM keychain_finished_execution f USING doomed WHERE f.execution_id = doomed.execution_id;

-- name: refusal_of
-- The reference's remembered refusal: `active` while it is not to be asked again (a refusal past its retry_at is kept
-- for its backoff until a success, a notice of its secret or the sweep forgets it).
SELECT error_code, retry_at > now() AS active FROM keychain_fetch_failure WHERE secret_ref = $1;

-- name: record_failure
-- Backoff doubles with every refusal: $3 seconds, then 2x, 4x, ... capped at one day. $4: the secret's identity.
INSERT INTO keychain_fetch_failure AS f (secret_ref, secret, error_code, attempts, retry_at)
VALUES ($1, $4, $2, 1, now() + make_interval(secs => $3))
ON CONFLICT (secret_ref) DO UPDATE
SET error_code = excluded.error_code, secret = excluded.secret, attempts = f.attempts + 1, updated_at = now(),
    retry_at = now() + make_interval(secs => least($3 * 2 ^ least(f.attempts, 20), 86400));

-- name: forget_failure
-- Secret Manager answered this reference: its backoff starts again from the first step.
DELETE FROM keychain_fetch_failure WHERE secret_ref = $1;

-- name: rekey_candidates
-- Keyset pagination over rows sealed under any key but the active one, or before the write binding (format 1).
SELECT id, credential_name, scope_type, scope_id, key_id, data, write_id
FROM keychain
WHERE id > $1 AND (key_id <> $2 OR write_id IS NULL) AND data IS NOT NULL
ORDER BY id LIMIT $3;

-- name: rekey_rows
-- Replace a ciphertext only if the row still holds the one that was read: a concurrent refresh wins.
WITH r AS (
    SELECT * FROM unnest($1::bigint[], $2::text[], $3::bytea[], $4::bigint[], $5::bytea[])
        AS r(id, key_id, data, write_id, old_data)
), locked AS (  -- lock order 4
    SELECT k.id FROM keychain k WHERE k.id IN (SELECT id FROM r)
    ORDER BY k.credential_name COLLATE "C", k.scope_type COLLATE "C", k.scope_id COLLATE "C"
    FOR UPDATE
)
UPDATE keychain k SET key_id = r.key_id, data = r.data, write_id = r.write_id
FROM r JOIN locked USING (id)
WHERE k.id = r.id AND k.data = r.old_data;

-- name: stats
SELECT scope_type, state,
       count(*)                                   AS rows,
       count(*) FILTER (WHERE expires_at <= now()) AS expired,
       count(*) FILTER (WHERE access_count > 0)   AS read_rows,
       coalesce(sum(access_count), 0)::bigint     AS hits
FROM keychain GROUP BY scope_type, state ORDER BY scope_type, state;

-- name: secret_generations
SELECT secret, generation FROM keychain_secret_state WHERE secret = ANY($1::text[]);

-- name: ensure_secret_states
-- A state row must exist for a writer to hold it FOR SHARE (an invalidator creating it concurrently then waits).
INSERT INTO keychain_secret_state (secret)
SELECT s FROM (SELECT DISTINCT s FROM unnest($1::text[]) AS s) AS ids ORDER BY s COLLATE "C"  -- lock order 2
ON CONFLICT DO NOTHING;

-- name: lock_secret_states
-- Held until the writer commits: an invalidation of these secrets waits, then sees (and marks) what was written.
SELECT secret, generation FROM keychain_secret_state
WHERE secret = ANY($1::text[]) ORDER BY secret COLLATE "C" FOR SHARE;  -- lock order 2

-- name: record_notice
-- Returns a row only the first time a notification is applied.
INSERT INTO keychain_applied_notice (notice_id) VALUES ($1) ON CONFLICT DO NOTHING RETURNING notice_id;

-- name: bump_generations
-- The generations of these secrets ($1: identities), and of every project's secret at path $2 (NULL: none), move on.
-- Waits for writers holding the state rows, so the next statement of this transaction sees their rows.
INSERT INTO keychain_secret_state AS s (secret, generation, invalidated_at)
SELECT k, 1, now() FROM (
    SELECT unnest($1::text[]) AS k
    UNION
    SELECT secret FROM keychain_secret_state WHERE regexp_replace(secret, '^projects/[^/]+/', '') = $2
) AS keys
ORDER BY k COLLATE "C"  -- lock order 2
ON CONFLICT (secret) DO UPDATE SET generation = s.generation + 1, invalidated_at = now();

-- name: bump_all_generations
WITH locked AS (SELECT secret FROM keychain_secret_state ORDER BY secret COLLATE "C" FOR UPDATE)  -- order 2
UPDATE keychain_secret_state s SET generation = s.generation + 1, invalidated_at = now()
FROM locked WHERE s.secret = locked.secret;

-- name: secrets_held_by
-- The secrets that the rows and copies of a credential name ($1) or of an execution ($2) hold: what an operator's
-- invalidation of them fences and has fetched anew.
SELECT DISTINCT s->>'secret' AS secret
FROM (SELECT sources FROM keychain
      WHERE credential_name = $1 OR (scope_type = 'execution' AND execution_id = $2)
      UNION ALL
      SELECT sources FROM keychain_copy
      WHERE credential_name = $1 OR execution_id = $2 OR parent_execution_id = $2) AS held,
     jsonb_array_elements(held.sources) AS s
WHERE s ? 'secret';

-- name: mark_stale_matching
-- $1 = {'[{"secret": "projects/N/secrets/S", ...}]', ...}: rows whose sources contain an element matching any of them
-- stop being served (Selection.sources_patterns). A refusal's row becomes stale too (no value, its error code gone:
-- the notice may have ended the refusal), so that the re-warm asks again.
WITH locked AS (  -- lock order 4
    SELECT id FROM keychain WHERE sources @> ANY($1::jsonb[]) AND state IN ('ready', 'failed')
    ORDER BY credential_name COLLATE "C", scope_type COLLATE "C", scope_id COLLATE "C" FOR UPDATE
)
UPDATE keychain k SET state = 'stale', error_code = NULL, updated_at = now() FROM locked WHERE k.id = locked.id;

-- name: delete_matching
WITH doomed AS (  -- lock order 4
    SELECT id FROM keychain WHERE sources @> ANY($1::jsonb[])
    ORDER BY credential_name COLLATE "C", scope_type COLLATE "C", scope_id COLLATE "C" FOR UPDATE
)
DELETE FROM keychain k USING doomed WHERE k.id = doomed.id;

-- name: stale_rows_matching
-- What re-warm refreshes: stale rows of one secret (finished executions' rows are already gone).
SELECT credential_name, cache_type, scope_type, execution_id, session_id, sources
FROM keychain WHERE sources @> ANY($1::jsonb[]) AND state = 'stale'
ORDER BY id LIMIT $2;

-- name: stale_secrets
-- Secrets with rows invalidated and not yet refreshed (the worker's maintenance refreshes them).
SELECT DISTINCT s->>'secret' AS secret
FROM keychain k, jsonb_array_elements(k.sources) s
WHERE k.state = 'stale' AND s ? 'secret'
LIMIT $1;

-- name: forget_failures
-- The refusals of these secrets ($1: identities), or of every project's secret at path $2 (NULL: none).
WITH doomed AS (SELECT secret_ref FROM keychain_fetch_failure
                WHERE secret = ANY($1::text[]) OR regexp_replace(secret, '^projects/[^/]+/', '') = $2
                ORDER BY secret_ref COLLATE "C" FOR UPDATE)  -- lock order 5
DELETE FROM keychain_fetch_failure f USING doomed WHERE f.secret_ref = doomed.secret_ref;

-- name: forget_every_failure
WITH doomed AS (SELECT secret_ref FROM keychain_fetch_failure ORDER BY secret_ref COLLATE "C" FOR UPDATE)  -- order 5
DELETE FROM keychain_fetch_failure f USING doomed WHERE f.secret_ref = doomed.secret_ref;

-- name: latest_secrets_to_check
-- Reconciliation: secrets that ready rows hold through `latest`, least recently checked first, with the versions
-- those rows resolved to and a reference to ask Secret Manager with. Reads the summary only (migration 0006), so a
-- round costs the same on a table of any size.
SELECT h.secret, min(h.ref) AS ref, array_agg(DISTINCT h.version) AS versions
FROM keychain_latest_held h
LEFT JOIN keychain_secret_state s USING (secret)
WHERE h.held_until > now()
GROUP BY h.secret, s.checked_at
ORDER BY s.checked_at NULLS FIRST
LIMIT $1;

-- name: forget_latest_held
-- The rows an invalidation stopped serving: of these secrets ($1: identities, or every project's at path $2), of
-- version $3 (NULL: of every version).
WITH doomed AS (SELECT secret, version, held_until FROM keychain_latest_held
                WHERE (secret = ANY($1::text[]) OR regexp_replace(secret, '^projects/[^/]+/', '') = $2)
                  AND ($3::text IS NULL OR version = $3)
                ORDER BY secret COLLATE "C", version COLLATE "C", held_until FOR UPDATE)  -- lock order 5
DELETE FROM keychain_latest_held h USING doomed
WHERE (h.secret, h.version, h.held_until) = (doomed.secret, doomed.version, doomed.held_until);

-- name: sweep_latest_held
WITH doomed AS (SELECT secret, version, held_until FROM keychain_latest_held WHERE held_until <= now()
                FOR UPDATE SKIP LOCKED)
DELETE FROM keychain_latest_held h USING doomed
WHERE (h.secret, h.version, h.held_until) = (doomed.secret, doomed.version, doomed.held_until);

-- name: mark_checked
INSERT INTO keychain_secret_state AS s (secret, checked_at) VALUES ($1, now())
ON CONFLICT (secret) DO UPDATE SET checked_at = now();

-- name: project_numbers
SELECT project_id, project_number FROM keychain_project WHERE project_id = ANY($1::text[]);

-- name: learn_project_number
-- Secret Manager answered a reference naming project $1 by id with a name by its number $2 (keychain/projects.py).
INSERT INTO keychain_project (project_id, project_number) VALUES ($1, $2) ON CONFLICT DO NOTHING;

-- name: sweep_notices
WITH doomed AS (SELECT notice_id FROM keychain_applied_notice WHERE applied_at < now() - make_interval(secs => $1)
                FOR UPDATE SKIP LOCKED)
DELETE FROM keychain_applied_notice n USING doomed WHERE n.notice_id = doomed.notice_id;

-- name: record_copies
-- Copies a target wrote in this transaction, one element per copy (lock order 5: by key), and, like put_entries, the
-- secrets they hold through `latest` in the reconciliation summary.
WITH written AS (
    INSERT INTO keychain_copy AS c (target, copy_key, credential_name, execution_id, parent_execution_id, sources,
                                    fields, detail, state, written_at, expires_at)
    SELECT $1, r.copy_key, r.credential_name, r.execution_id, r.parent_execution_id, r.sources, r.fields, r.detail,
           'ready', now(), now() + make_interval(secs => r.ttl_seconds)
    FROM unnest($2::text[], $3::bigint[], $4::bigint[], $5::jsonb[], $6::int[], $7::jsonb[], $8::float8[], $9::text[])
         AS r(copy_key, execution_id, parent_execution_id, sources, fields, detail, ttl_seconds, credential_name)
    ORDER BY r.copy_key COLLATE "C"
    ON CONFLICT (target, copy_key) DO UPDATE
    SET credential_name = excluded.credential_name, execution_id = excluded.execution_id, parent_execution_id = excluded.parent_execution_id,
        sources = excluded.sources, fields = excluded.fields, detail = excluded.detail, state = 'ready',
        written_at = now(), expires_at = excluded.expires_at
    RETURNING c.sources, c.expires_at
), held AS (
    SELECT keychain_hold_latest(array_agg(w.sources), array_agg(w.expires_at)) FROM written w
)
SELECT (SELECT count(*) FROM written) FROM held;

-- name: copies_of
-- The copies a target holds under these keys: whether each is ready, and where its values came from.
SELECT copy_key, state = 'ready' AS ready, sources
FROM keychain_copy WHERE target = $1 AND copy_key = ANY($2::text[]);

-- name: copy_details
SELECT copy_key, sources, detail FROM keychain_copy WHERE target = $1 AND copy_key = ANY($2::text[]);

-- name: copies_of_children
SELECT copy_key FROM keychain_copy WHERE target = $1 AND parent_execution_id = $2;

-- name: copies_matching
SELECT copy_key FROM keychain_copy WHERE target = $1 AND sources @> ANY($2::jsonb[]) ORDER BY copy_key COLLATE "C";

-- name: mark_copies_stale
-- The copies under these keys ($2) stop being ready: their rows in the target's store stopped being served.
WITH locked AS (  -- lock order 5
    SELECT copy_key FROM keychain_copy WHERE target = $1 AND copy_key = ANY($2::text[]) AND state = 'ready'
    ORDER BY copy_key COLLATE "C" FOR UPDATE
)
UPDATE keychain_copy c SET state = 'stale' FROM locked WHERE c.target = $1 AND c.copy_key = locked.copy_key;

-- name: mark_every_copy_stale_matching
-- The library's own invalidation ($1 as mark_stale_matching's): copies of every target stop being ready, so that the
-- worker re-warms them even when the invalidation came through a door that does not reach their store (the CLI).
WITH locked AS (
    SELECT target, copy_key FROM keychain_copy WHERE sources @> ANY($1::jsonb[]) AND state = 'ready'
    ORDER BY target COLLATE "C", copy_key COLLATE "C" FOR UPDATE
)
UPDATE keychain_copy c SET state = 'stale' FROM locked
WHERE (c.target, c.copy_key) = (locked.target, locked.copy_key);

-- name: stale_copies
-- What a re-warm writes again: stale copies matching $2 (any of the patterns), of executions still running.
SELECT copy_key, execution_id, parent_execution_id, sources, detail FROM keychain_copy c
WHERE target = $1 AND state = 'stale' AND sources @> ANY($2::jsonb[])
  AND (execution_id IS NULL
       OR NOT EXISTS (SELECT 1 FROM keychain_finished_execution f WHERE f.execution_id = c.execution_id))
ORDER BY copy_key LIMIT $3;

-- name: stale_copy_secrets
SELECT DISTINCT s->>'secret' AS secret
FROM keychain_copy c, jsonb_array_elements(c.sources) s
WHERE c.target = $1 AND c.state = 'stale' AND s ? 'secret'
LIMIT $2;

-- name: forget_copies
-- Copies whose rows the target deleted from its store (purge, sweep): their keys and the values each held.
WITH doomed AS (
    SELECT copy_key FROM keychain_copy WHERE target = $1 AND copy_key = ANY($2::text[])
    ORDER BY copy_key COLLATE "C" FOR UPDATE
)
DELETE FROM keychain_copy c USING doomed WHERE c.target = $1 AND c.copy_key = doomed.copy_key
RETURNING c.copy_key, c.fields, c.detail;

-- name: sweep_copies
-- Copies long past their expiry whose rows were removed by someone else (never seen by a purge or a sweep).
WITH doomed AS (
    SELECT target, copy_key FROM keychain_copy WHERE expires_at < now() - make_interval(secs => $1)
    LIMIT $2 FOR UPDATE SKIP LOCKED
)
DELETE FROM keychain_copy c USING doomed WHERE (c.target, c.copy_key) = (doomed.target, doomed.copy_key);

-- name: finished_among
-- Which of these executions have finished (their fence): read under their fence locks, so none finishes meanwhile.
SELECT execution_id FROM keychain_finished_execution WHERE execution_id = ANY($1::bigint[]);

-- name: add_to_outbox
-- Inside an invalidation's transaction: what targets $1 (one element each) must still apply ($2 work, $3 ordering).
-- Lock order 5 (new rows only).
INSERT INTO keychain_outbox (target, work, ordering)
SELECT t, $2::jsonb, $3 FROM unnest($1::text[]) AS t ORDER BY t COLLATE "C";

-- name: outbox_due
-- A target's entries due now, oldest first, each only once every earlier entry of its ordering is done.
SELECT o.id, o.work, o.ordering, o.attempts FROM keychain_outbox o
WHERE o.target = $1 AND o.next_attempt_at <= now()
  AND NOT EXISTS (SELECT 1 FROM keychain_outbox e WHERE e.target = o.target AND e.ordering = o.ordering AND e.id < o.id)
ORDER BY o.id LIMIT $2;

-- name: claim_outbox_entry
-- Taken for the transaction that applies it (first in that transaction, before any other lock; SKIP LOCKED: another
-- process applying it already is left to it).
SELECT work FROM keychain_outbox WHERE id = $1 FOR UPDATE SKIP LOCKED;

-- name: outbox_entry_done
DELETE FROM keychain_outbox WHERE id = $1;

-- name: outbox_entry_failed
-- Not applied: tried again after $2 seconds; $3 the failure's reason (closed set), $4 whether it was refused for good.
UPDATE keychain_outbox SET attempts = attempts + 1, next_attempt_at = now() + make_interval(secs => $2),
                           failure = $3, permanent = $4
WHERE id = $1;

-- name: outbox_counts
-- Entries waiting, by target: all of them, those refused for good, and when the first entry at the head of its
-- ordering is due (a later entry waits for the head, whatever its own time).
SELECT o.target, count(*) AS waiting, count(*) FILTER (WHERE o.permanent) AS refused,
       coalesce(extract(epoch FROM min(o.next_attempt_at) FILTER (WHERE NOT EXISTS (
           SELECT 1 FROM keychain_outbox e WHERE e.target = o.target AND e.ordering = o.ordering AND e.id < o.id)
       ) - now()), 0)::float8 AS next_due_seconds
FROM keychain_outbox o GROUP BY o.target;

-- Every statement the noetl target runs on NoETL's own tables, by name. `{noetl}` is the quoted schema of NoETL's
-- tables (KEYCHAIN_CATALOG_SCHEMA). The warmer needs SELECT on `catalog` and `credential`, and SELECT, INSERT,
-- UPDATE, DELETE on `keychain`; it never creates, alters or drops anything of NoETL's.
-- Lock order (keychain/sql/queries.sql): NoETL's keychain rows come after the secrets' state rows and the
-- executions' fences, as our own rows do, and are always locked in cache_key order (COLLATE "C"); NoETL's server
-- writes and counts one row per statement, so it never holds one row while waiting for another.

-- name: upsert_rows
-- The rows NoETL's server itself would write on a miss (src/services/keychain.rs `set`, src/db/queries/keychain.rs
-- `upsert_keychain_entry`): every column its row model reads non-NULL, scope `local`, its TTL; upserted on the cache
-- key as the server does, so a row it wrote in a race is replaced by the same value. $7: the TTL in seconds.
INSERT INTO {noetl}.keychain AS k (
    cache_key, keychain_name, catalog_id, credential_type, cache_type, scope_type, execution_id, parent_execution_id,
    data_encrypted, expires_at, access_count, auto_renew, renew_config)
SELECT r.cache_key, r.keychain_name, r.catalog_id, 'secret', 'secret', 'local', r.execution_id, r.parent_execution_id,
       r.data_encrypted, now() + make_interval(secs => $7), 0, false, NULL
FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::bigint[], $6::text[])
     AS r(cache_key, keychain_name, catalog_id, execution_id, parent_execution_id, data_encrypted)
ORDER BY r.cache_key COLLATE "C"
ON CONFLICT (cache_key) DO UPDATE
SET data_encrypted = excluded.data_encrypted, expires_at = excluded.expires_at, auto_renew = excluded.auto_renew,
    renew_config = excluded.renew_config
RETURNING k.cache_key, k.access_count;  -- the reads the row had before this write (an upsert keeps its count)

-- name: fresh_rows
-- Which of these cache keys hold a row NoETL's server would serve for at least $2 more seconds.
SELECT cache_key FROM {noetl}.keychain
WHERE cache_key = ANY($1::text[]) AND expires_at > now() + make_interval(secs => $2);

-- name: expire_rows
-- An invalidation: these rows stop being served at once (NoETL's server takes `expires_at < now` for a miss) until
-- the re-warm writes the new value; their bookkeeping (`access_count`) stays.
WITH locked AS (
    SELECT cache_key FROM {noetl}.keychain WHERE cache_key = ANY($1::text[])
    ORDER BY cache_key COLLATE "C" FOR UPDATE
)
UPDATE {noetl}.keychain k SET expires_at = least(k.expires_at, now())
FROM locked WHERE k.cache_key = locked.cache_key
RETURNING k.cache_key;

-- name: expire_where
-- An operator's invalidation ($1: a keychain name, $2: an execution id, or both NULL: every row), whoever wrote the
-- rows: they stop being served at once (NoETL's server misses, and fetches itself, unless the re-warm came first).
WITH locked AS (
    SELECT cache_key FROM {noetl}.keychain
    WHERE ($1::text IS NULL OR keychain_name = $1)
      AND ($2::bigint IS NULL OR execution_id = $2 OR parent_execution_id = $2)
      AND (expires_at IS NULL OR expires_at > now())
    ORDER BY cache_key COLLATE "C" FOR UPDATE
)
UPDATE {noetl}.keychain k SET expires_at = now()
FROM locked WHERE k.cache_key = locked.cache_key
RETURNING k.cache_key;

-- name: delete_rows
-- An invalidation with KEYCHAIN_REWARM_MODE=drop.
WITH doomed AS (
    SELECT cache_key FROM {noetl}.keychain WHERE cache_key = ANY($1::text[])
    ORDER BY cache_key COLLATE "C" FOR UPDATE
)
DELETE FROM {noetl}.keychain k USING doomed WHERE k.cache_key = doomed.cache_key
RETURNING k.cache_key;

-- name: purge_execution
-- A finished execution's rows, and those of the executions it started (NoETL's `parent_execution_id`: "top-level
-- execution id for cleanup when parent completes"; $2: the children's rows the warmer wrote through NoETL's API,
-- which records no parent), whoever wrote them; with their read counts.
WITH doomed AS (
    SELECT cache_key FROM {noetl}.keychain
    WHERE execution_id = $1 OR parent_execution_id = $1 OR cache_key = ANY($2::text[])
    ORDER BY cache_key COLLATE "C" FOR UPDATE
)
DELETE FROM {noetl}.keychain k USING doomed WHERE k.cache_key = doomed.cache_key
RETURNING k.cache_key, coalesce(k.access_count, 0) AS access_count,
          encode(sha256(convert_to(k.data_encrypted, 'UTF8')), 'hex') AS sealed;

-- name: sweep_expired
-- One bounded batch of expired rows, whoever wrote them, never an auto_renew row (NoETL renews those from their
-- renew_config), as NoETL's own `delete_expired_entries` would; SKIP LOCKED: the sweep never waits for a row
-- NoETL's server is counting, nor holds one long.
WITH doomed AS (
    SELECT cache_key FROM {noetl}.keychain
    WHERE expires_at IS NOT NULL AND expires_at < now() AND auto_renew = false
    ORDER BY expires_at LIMIT $1
    FOR UPDATE SKIP LOCKED
)
DELETE FROM {noetl}.keychain k USING doomed WHERE k.cache_key = doomed.cache_key
RETURNING k.cache_key, coalesce(k.access_count, 0) AS access_count,
          encode(sha256(convert_to(k.data_encrypted, 'UTF8')), 'hex') AS sealed;

-- name: held_rows
-- What these rows hold now (the fingerprint of their envelope: whether each is still the one the warmer wrote), and
-- their reads so far.
SELECT cache_key, encode(sha256(convert_to(data_encrypted, 'UTF8')), 'hex') AS sealed,
       coalesce(access_count, 0) AS access_count
FROM {noetl}.keychain WHERE cache_key = ANY($1::text[]);

-- name: rows_where
-- The rows an invalidation reaches ($1: these cache keys; or $2: a keychain name, $3: an execution id, or all three
-- NULL: every row), with what NoETL's keychain API names a row by (writes through the API: they are deleted there).
SELECT cache_key, catalog_id, keychain_name, scope_type, execution_id FROM {noetl}.keychain
WHERE ($1::text[] IS NULL OR cache_key = ANY($1::text[]))
  AND ($2::text IS NULL OR keychain_name = $2)
  AND ($3::bigint IS NULL OR execution_id = $3 OR parent_execution_id = $3)
ORDER BY cache_key COLLATE "C";

-- name: shadowed_aliases
-- Aliases NoETL's server answers from its credential table (by id when the alias is a number, else by name), never
-- from the keychain.
SELECT name AS alias FROM {noetl}.credential WHERE name = ANY($1::text[])
UNION
SELECT id::text FROM {noetl}.credential WHERE id = ANY($2::bigint[]);

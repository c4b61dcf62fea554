-- Copies: values of secrets a worker target wrote into another store (NoETL's own `noetl.keychain`, for one), one
-- row per copy, with what it came from. A rotation finds every copy through `sources` (the same elements as
-- keychain.sources), including one the other store's owner wrote again under the same key; the purge and the sweep
-- tell the copies the warmer wrote from the rows the other store's owner wrote itself. The library knows nothing of
-- the other store's format: `target` names it, `copy_key` is its key there, `detail` what the target needs to write
-- the copy again.
CREATE TABLE keychain_copy (
    target              TEXT        NOT NULL,
    copy_key            TEXT        NOT NULL,
    execution_id        BIGINT,
    parent_execution_id BIGINT,
    sources             JSONB       NOT NULL,
    fields              INTEGER     NOT NULL CHECK (fields > 0),  -- Secret Manager values the copy holds
    detail              JSONB       NOT NULL DEFAULT '{}',
    state               TEXT        NOT NULL DEFAULT 'ready' CHECK (state IN ('ready', 'stale')),
    written_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at          TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (target, copy_key)
);
CREATE INDEX keychain_copy_sources_idx ON keychain_copy USING gin (sources jsonb_path_ops);
CREATE INDEX keychain_copy_execution_idx ON keychain_copy (execution_id);
CREATE INDEX keychain_copy_expires_idx ON keychain_copy (expires_at);
CREATE INDEX keychain_copy_stale_idx ON keychain_copy (target, copy_key) WHERE state = 'stale';

-- The reconciliation summary (0006) of rows just written, for every writer of rows that hold secrets through
-- `latest` (put_entries for our rows, record_copies for copies): one place for what put_entries did inline.
-- Lock order 5: keys inserted in order, ON CONFLICT DO NOTHING (no lock on an existing row).
CREATE FUNCTION keychain_hold_latest(sources jsonb[], expires timestamptz[]) RETURNS void LANGUAGE sql AS $$
    INSERT INTO keychain_latest_held (secret_id, version, held_until, ref)
    SELECT * FROM (
        SELECT src->>'secret_id' AS secret_id, src->>'version' AS version,
               date_bin('10 minutes', w.expires_at, TIMESTAMPTZ '2000-01-01 00:00:00+00') + interval '10 minutes'
                   AS held_until,
               min(src->>'ref') AS ref
        FROM unnest(sources, expires) AS w(sources, expires_at), jsonb_array_elements(w.sources) AS src
        WHERE src->>'ref' LIKE '%/versions/latest' AND src ? 'version' AND src ? 'secret_id'
        GROUP BY 1, 2, 3
    ) AS held
    ORDER BY secret_id COLLATE "C", version COLLATE "C", held_until
    ON CONFLICT DO NOTHING
$$;

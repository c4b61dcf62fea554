-- Constant-cost maintenance on a large table (10 million rows).
--
-- Reconciliation asks Secret Manager for the latest version of every secret that ready rows hold through `latest`.
-- Finding those secrets by unnesting the `sources` of every ready row cost a full scan per round; this summary holds
-- one row per (secret, version resolved, expiry bucket), written by the same statement as the keychain rows, so a
-- round reads the summary alone. A row is added with ON CONFLICT DO NOTHING (no lock on an existing row, so
-- concurrent writers of one secret never queue on it); it leaves when the rows it stands for stop being ready:
-- an invalidation of the secret (or of that version) deletes it, and the sweep deletes it once every row of its
-- bucket has expired (`held_until` is the end of the bucket). A summary row that outlives its keychain rows (an
-- execution purged early) costs at most one extra check until its bucket ends.
CREATE TABLE keychain_latest_held (
    secret_id  TEXT        NOT NULL,
    version    TEXT        NOT NULL,  -- the version `latest` resolved to when the rows were written
    held_until TIMESTAMPTZ NOT NULL,  -- end of the 10-minute bucket holding the rows' expires_at
    ref        TEXT        NOT NULL,  -- a reference to ask Secret Manager with (projects/P/secrets/S/versions/latest)
    PRIMARY KEY (secret_id, version, held_until)
);
CREATE INDEX keychain_latest_held_until_idx ON keychain_latest_held (held_until);

INSERT INTO keychain_latest_held (secret_id, version, held_until, ref)
SELECT src->>'secret_id', src->>'version',
       date_bin('10 minutes', k.expires_at, TIMESTAMPTZ '2000-01-01 00:00:00+00') + interval '10 minutes',
       min(src->>'ref')
FROM keychain k, jsonb_array_elements(k.sources) AS src
WHERE k.state = 'ready' AND src->>'ref' LIKE '%/versions/latest' AND src ? 'version' AND src ? 'secret_id'
GROUP BY 1, 2, 3
ON CONFLICT DO NOTHING;

-- The refresh of invalidated rows looks for stale rows; they are few, the table is not.
CREATE INDEX keychain_stale_idx ON keychain (id) WHERE state = 'stale';

-- Keep-warm looks for global rows near expiry; execution rows (nearly all of a large table) are not scanned for it.
CREATE INDEX keychain_global_expires_idx ON keychain (expires_at) WHERE scope_type = 'global' AND state = 'ready';

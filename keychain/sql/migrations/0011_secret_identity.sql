-- One identity for a secret (issue 31): its project BY NUMBER, its location and its id, as Secret Manager answers
-- its name: `projects/NUMBER[/locations/L]/secrets/S` (refs.SecretIdentity.key), or `projects/*/...` while the
-- project's number is not known. Before this migration the keychain knew a secret by its short id (`S`, `L/S`), so
-- `db` of two projects shared rotation generations, shared fetches, the reconciliation summary and refusals.

-- Project ids and their numbers, learned from Secret Manager's answers (keychain/projects.py).
CREATE TABLE keychain_project (
    project_id     TEXT        PRIMARY KEY,
    project_number TEXT        NOT NULL CHECK (project_number ~ '^[0-9]+$'),
    learned_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- What the rows written so far teach: an element's reference by project id beside the name Secret Manager answered.
INSERT INTO keychain_project (project_id, project_number)
SELECT DISTINCT ON (split_part(e->>'ref', '/', 2)) split_part(e->>'ref', '/', 2), split_part(n, '/', 2)
FROM (SELECT sources FROM keychain UNION ALL SELECT sources FROM keychain_copy) AS r,
     jsonb_array_elements(CASE WHEN jsonb_typeof(r.sources) = 'array' THEN r.sources ELSE '[]' END) AS e,
     jsonb_array_elements_text(CASE WHEN jsonb_typeof(e->'names') = 'array' THEN e->'names' ELSE '[]' END) AS n
WHERE split_part(e->>'ref', '/', 2) !~ '^[0-9]+$' AND n ~ '^projects/[0-9]+/'
  AND regexp_replace(n, '^projects/[^/]+/', '')
      = regexp_replace(regexp_replace(e->>'ref', '/versions/[^/]+$', ''), '^projects/[^/]+/', '')
ON CONFLICT DO NOTHING;

-- A reference's secret's identity key: its project's number as written or as learned, else unknown.
CREATE FUNCTION pg_temp.identity_of_ref(ref text) RETURNS text LANGUAGE sql AS $$
    SELECT 'projects/'
           || CASE WHEN split_part(ref, '/', 2) ~ '^[0-9]+$' THEN split_part(ref, '/', 2)
                   ELSE coalesce((SELECT p.project_number FROM keychain_project p
                                  WHERE p.project_id = split_part(ref, '/', 2)), '*') END
           || '/' || regexp_replace(regexp_replace(ref, '/versions/[^/]+$', ''), '^projects/[^/]+/', '')
$$;

-- A `sources` element's identity: the name Secret Manager answered (by number) when it answered, else its reference's.
CREATE FUNCTION pg_temp.with_identity(sources jsonb) RETURNS jsonb LANGUAGE sql AS $$
    SELECT coalesce(jsonb_agg(e || jsonb_build_object('secret', coalesce(
               (SELECT told.name FROM jsonb_array_elements_text(CASE WHEN jsonb_typeof(e->'names') = 'array'
                                                             THEN e->'names' ELSE '[]' END) AS told(name)
                WHERE told.name ~ '^projects/[0-9]+/' LIMIT 1),
               pg_temp.identity_of_ref(e->>'ref'))) ORDER BY x.position), '[]'::jsonb)
    FROM jsonb_array_elements(sources) WITH ORDINALITY AS x(e, position)
$$;

UPDATE keychain SET sources = pg_temp.with_identity(sources)
WHERE jsonb_typeof(sources) = 'array' AND sources <> '[]';
UPDATE keychain_copy SET sources = pg_temp.with_identity(sources)
WHERE jsonb_typeof(sources) = 'array' AND sources <> '[]';

-- A refusal's row that a notice made uncertain becomes stale (so that the re-warm asks again) and has no value: only a
-- ready row must hold one. Before, such an invalidation broke this constraint and failed whole.
ALTER TABLE keychain DROP CONSTRAINT keychain_value_encrypted;
ALTER TABLE keychain ADD CONSTRAINT keychain_value_encrypted
    CHECK (state <> 'ready' OR (data IS NOT NULL AND key_id IS NOT NULL));

-- Rotation generations by identity. A generation kept under a short id fences nothing any more: no writer reads it.
ALTER TABLE keychain_secret_state RENAME COLUMN secret_id TO secret;
DELETE FROM keychain_secret_state WHERE secret NOT LIKE 'projects/%';

-- Shared fetches are a moment's values: dropped, and fetched again.
TRUNCATE keychain_fetched;
ALTER TABLE keychain_fetched RENAME COLUMN secret_id TO secret;

-- Refusals: which secret each was of, so that a notice of that secret (or an operator's invalidation) clears it.
ALTER TABLE keychain_fetch_failure ADD COLUMN secret TEXT;
UPDATE keychain_fetch_failure SET secret = pg_temp.identity_of_ref(secret_ref);
ALTER TABLE keychain_fetch_failure ALTER COLUMN secret SET NOT NULL;
CREATE INDEX keychain_fetch_failure_secret_idx ON keychain_fetch_failure (secret);

-- Copies: the name the entry has in the target's store, so that an operator's invalidation of a credential finds the
-- secrets its copies hold (to fence them and fetch them anew). Unknown for copies written before.
ALTER TABLE keychain_copy ADD COLUMN credential_name TEXT;
CREATE INDEX keychain_copy_credential_idx ON keychain_copy (credential_name) WHERE credential_name IS NOT NULL;

-- The reconciliation summary, by identity (staging's `db` is compared with staging's latest, never with prod's).
ALTER TABLE keychain_latest_held RENAME COLUMN secret_id TO secret;
DELETE FROM keychain_latest_held;

CREATE OR REPLACE FUNCTION keychain_hold_latest(sources jsonb[], expires timestamptz[]) RETURNS void LANGUAGE sql AS $$
    INSERT INTO keychain_latest_held (secret, version, held_until, ref)
    SELECT * FROM (
        SELECT src->>'secret' AS secret, src->>'version' AS version,
               date_bin('10 minutes', w.expires_at, TIMESTAMPTZ '2000-01-01 00:00:00+00') + interval '10 minutes'
                   AS held_until,
               min(src->>'ref') AS ref
        FROM unnest(sources, expires) AS w(sources, expires_at), jsonb_array_elements(w.sources) AS src
        WHERE src->>'ref' LIKE '%/versions/latest' AND src ? 'version' AND src ? 'secret'
        GROUP BY 1, 2, 3
    ) AS held
    ORDER BY secret COLLATE "C", version COLLATE "C", held_until
    ON CONFLICT DO NOTHING
$$;

SELECT keychain_hold_latest(array_agg(sources), array_agg(expires_at))
FROM (SELECT sources, expires_at FROM keychain WHERE state = 'ready' AND expires_at > now()
      UNION ALL
      SELECT sources, expires_at FROM keychain_copy WHERE state = 'ready' AND expires_at > now()) AS held;

DROP FUNCTION pg_temp.with_identity(jsonb);
DROP FUNCTION pg_temp.identity_of_ref(text);

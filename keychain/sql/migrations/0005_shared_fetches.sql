-- Secret versions fetched in the last moments, shared by every process (several worker replicas, the workers'
-- read-through): one Secret Manager call per secret version per burst across all of them. Filled under a
-- per-reference advisory lock, so a process that needs a reference being fetched waits for that fetch instead of
-- calling again. Sealed with the key ring like every row (bound to the reference and the write), and fenced by the
-- secret's rotation generation: a value fetched before an invalidation is never used after it. Swept after
-- KEYCHAIN_SHARED_FETCH_SECONDS.
CREATE TABLE keychain_fetched (
    ref          TEXT        PRIMARY KEY,  -- the reference as fetched: projects/P/secrets/S/versions/V
    secret_id    TEXT        NOT NULL,
    generation   BIGINT      NOT NULL,     -- the secret's generation, read before the fetch
    version_name TEXT        NOT NULL,     -- as Secret Manager answered
    key_id       TEXT        NOT NULL,
    data         BYTEA       NOT NULL,
    write_id     BIGINT      NOT NULL,
    fetched_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX keychain_fetched_secret_idx ON keychain_fetched (secret_id);
CREATE INDEX keychain_fetched_at_idx ON keychain_fetched (fetched_at);

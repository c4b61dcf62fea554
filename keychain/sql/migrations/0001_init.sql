-- The keychain: one encrypted entry per (credential, scope, execution/session).
-- Runs with search_path set to the keychain schema (KEYCHAIN_SCHEMA, `noetl` by default).

CREATE TABLE keychain (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    credential_name TEXT        NOT NULL CHECK (length(credential_name) BETWEEN 1 AND 1024),
    credential_type TEXT        NOT NULL DEFAULT 'secret_manager',
    scope_type      TEXT        NOT NULL CHECK (scope_type IN ('execution', 'global', 'session')),
    cache_type      TEXT        NOT NULL DEFAULT 'secret' CHECK (cache_type IN ('secret', 'token', 'config')),
    execution_id    BIGINT,
    session_id      TEXT,
    -- One text key for every scope, so that one plain unique index enforces one row per identity
    -- (the seed's PRIMARY KEY (credential_name, execution_id) could not hold global rows, whose execution_id is NULL).
    scope_id        TEXT        GENERATED ALWAYS AS (
                        CASE scope_type WHEN 'execution' THEN execution_id::text
                                        WHEN 'session'   THEN session_id
                                        ELSE '' END) STORED,
    -- ready: served; stale: invalidated, kept so that re-warm knows what to refresh, never served;
    -- failed: Secret Manager refused (error_code), surfaced to readers as an error until it expires.
    state           TEXT        NOT NULL DEFAULT 'ready' CHECK (state IN ('ready', 'stale', 'failed')),
    error_code      TEXT,
    key_id          TEXT,
    data            BYTEA,      -- AES-256-GCM ciphertext; associated data = row identity + key_id
    -- Where the value came from: [{"ref": as written, "names": [secret names], "version": "3", "pinned": bool}],
    -- one element per Secret Manager reference (a keychain entry maps several). Rotation finds rows through it.
    sources         JSONB       NOT NULL DEFAULT '[]',
    ttl_seconds     INTEGER     NOT NULL DEFAULT 3600 CHECK (ttl_seconds > 0),
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at      TIMESTAMPTZ NOT NULL,
    -- Hit bookkeeping: deliberately in no index, so that a read is a HOT update.
    accessed_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    access_count    INTEGER     NOT NULL DEFAULT 0,
    CONSTRAINT keychain_identity UNIQUE (credential_name, scope_type, scope_id),
    CONSTRAINT keychain_execution_scope CHECK ((scope_type = 'execution') = (execution_id IS NOT NULL)),
    CONSTRAINT keychain_session_scope CHECK ((scope_type = 'session') = (session_id IS NOT NULL)),
    CONSTRAINT keychain_failed_has_code CHECK ((state = 'failed') = (error_code IS NOT NULL)),
    CONSTRAINT keychain_value_encrypted CHECK (state = 'failed' OR (data IS NOT NULL AND key_id IS NOT NULL))
) WITH (fillfactor = 80);  -- room on each page for HOT updates of the bookkeeping columns

CREATE INDEX keychain_execution_idx ON keychain (execution_id) WHERE execution_id IS NOT NULL;
CREATE INDEX keychain_expires_idx ON keychain (expires_at);
CREATE INDEX keychain_sources_idx ON keychain USING gin (sources jsonb_path_ops);

-- Negative cache: Secret Manager said NOT_FOUND / PERMISSION_DENIED / disabled for a reference; ask again only
-- after retry_at, with a backoff that grows with each refusal.
CREATE TABLE keychain_fetch_failure (
    secret_ref  TEXT        PRIMARY KEY,
    error_code  TEXT        NOT NULL,
    attempts    INTEGER     NOT NULL DEFAULT 1,
    retry_at    TIMESTAMPTZ NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Rotation fencing. Every invalidation of a secret bumps its generation; a writer records the generation before it
-- fetches and writes only if it is unchanged, holding the state row FOR SHARE while it writes, so a value fetched
-- before an invalidation can never be written after it. Keyed by the secret's short id (S of projects/P/secrets/S)
-- because notifications and references name the project by id or by number.
CREATE TABLE keychain_secret_state (
    secret_id      TEXT        PRIMARY KEY,
    generation     BIGINT      NOT NULL DEFAULT 0,
    invalidated_at TIMESTAMPTZ,
    checked_at     TIMESTAMPTZ  -- reconciliation: when `latest` was last compared with what rows hold
);

-- Notifications already applied, by Pub/Sub message id: a redelivered or duplicated notice changes nothing.
CREATE TABLE keychain_applied_notice (
    notice_id  TEXT        PRIMARY KEY,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX keychain_applied_notice_at_idx ON keychain_applied_notice (applied_at);

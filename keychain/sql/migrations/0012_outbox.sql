-- The outbox (issue 32): what a worker target (one with a store of its own: NoETL's keychain) must still apply of an
-- invalidation. Recorded in the same transaction as the invalidation of our own rows, which therefore stop being
-- served at once whatever the other store answers; each target applies its entries in its own transactions, with its
-- own retries, in order per `ordering` (a secret's identity, a credential, an execution), until done. An entry the
-- target refused for good (`permanent`) stays, retried rarely, counted and alerting, and holds nothing else.
CREATE TABLE keychain_outbox (
    id              BIGINT      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    target          TEXT        NOT NULL,
    work            JSONB       NOT NULL,  -- what to apply, in the target's terms (an invalidation's selection)
    ordering        TEXT        NOT NULL,  -- entries of one ordering are applied in id order
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    attempts        INTEGER     NOT NULL DEFAULT 0,
    next_attempt_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    failure         TEXT,                  -- the last failure's reason (a closed set), NULL before any
    permanent       BOOLEAN     NOT NULL DEFAULT false
);
CREATE INDEX keychain_outbox_target_idx ON keychain_outbox (target, id);
CREATE INDEX keychain_outbox_ordering_idx ON keychain_outbox (target, ordering, id);

-- The Secret Manager call budget, shared by every process (worker replicas and the workers' read-throughs): a token
-- bucket of SECRET_MANAGER_MAX_CALLS_PER_MINUTE calls, refilled continuously. A caller takes a token in a statement
-- of its own right before it calls (a row lock held for that statement only) and waits out any debt.
CREATE TABLE keychain_call_budget (
    name       TEXT             PRIMARY KEY,
    tokens     DOUBLE PRECISION NOT NULL,  -- below 0: the debt of callers waiting for their turn
    updated_at TIMESTAMPTZ      NOT NULL
);

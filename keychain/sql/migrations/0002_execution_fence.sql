-- Finished executions: a fence, so that a warm or read-through still fetching when the execution's finish event
-- was processed cannot write rows afterwards (including on redelivery of the start event).
CREATE TABLE keychain_finished_execution (
    execution_id BIGINT      PRIMARY KEY,
    finished_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX keychain_finished_execution_at_idx ON keychain_finished_execution (finished_at);

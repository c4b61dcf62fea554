"""NoETL's own tables, for the demo and the tests: written for this project from the columns and constraints NoETL
publishes in noetl/noetl `noetl/database/ddl/postgres/schema_ddl.sql` (not copied from it), in a schema of the
caller's choosing (NoETL's is `noetl`). Only the tables the warmer and NoETL's credential lookup touch: `resource`
(what `catalog.kind` references), `catalog`, `event` (range-partitioned by execution id, as NoETL's is), `credential`
and `keychain`."""

from __future__ import annotations

NOETL_DDL = """
CREATE SCHEMA IF NOT EXISTS {schema};

CREATE TABLE IF NOT EXISTS {schema}.resource (
    name VARCHAR PRIMARY KEY,
    meta JSONB
);
INSERT INTO {schema}.resource (name, meta) VALUES ('playbook', '{{"executable": true, "catalog": true}}')
ON CONFLICT (name) DO NOTHING;

CREATE TABLE IF NOT EXISTS {schema}.catalog (
    catalog_id BIGINT PRIMARY KEY,
    path       TEXT        NOT NULL,
    version    SMALLSERIAL NOT NULL,
    kind       VARCHAR     NOT NULL REFERENCES {schema}.resource(name),
    content    TEXT,
    layout     JSONB,
    payload    JSONB,
    meta       JSONB,
    created_at TIMESTAMP   NOT NULL DEFAULT CURRENT_TIMESTAMP,
    UNIQUE (path, version)
);

CREATE TABLE IF NOT EXISTS {schema}.event (
    execution_id        BIGINT,
    catalog_id          BIGINT NOT NULL REFERENCES {schema}.catalog(catalog_id),
    event_id            BIGINT,
    parent_event_id     BIGINT,
    parent_execution_id BIGINT,
    created_at          TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    event_type          VARCHAR,
    node_id             VARCHAR,
    node_name           VARCHAR,
    node_type           VARCHAR,
    status              VARCHAR,
    duration            DOUBLE PRECISION,
    context             JSONB,
    result              JSONB,
    meta                JSONB,
    error               TEXT,
    worker_id           VARCHAR,
    PRIMARY KEY (execution_id, event_id)
) PARTITION BY RANGE (execution_id);
CREATE TABLE IF NOT EXISTS {schema}.event_default PARTITION OF {schema}.event DEFAULT;

CREATE TABLE IF NOT EXISTS {schema}.credential (
    id             BIGINT PRIMARY KEY,
    name           TEXT NOT NULL UNIQUE,
    type           TEXT NOT NULL,
    data_encrypted TEXT NOT NULL,
    schema         JSONB,
    meta           JSONB,
    tags           TEXT[],
    description    TEXT,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS {schema}.keychain (
    cache_key           TEXT PRIMARY KEY,
    keychain_name       TEXT NOT NULL,
    catalog_id          BIGINT NOT NULL REFERENCES {schema}.catalog(catalog_id),
    credential_type     TEXT NOT NULL,
    cache_type          TEXT NOT NULL CHECK (cache_type IN ('secret', 'token')),
    scope_type          TEXT NOT NULL CHECK (scope_type IN ('local', 'global', 'shared')),
    execution_id        BIGINT,
    parent_execution_id BIGINT,
    data_encrypted      TEXT NOT NULL,
    schema              JSONB,
    expires_at          TIMESTAMPTZ NOT NULL,
    created_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    accessed_at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    access_count        INTEGER DEFAULT 0,
    auto_renew          BOOLEAN DEFAULT false,
    renew_config        JSONB
);
CREATE INDEX IF NOT EXISTS idx_keychain_execution ON {schema}.keychain (execution_id) WHERE execution_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS idx_keychain_parent_execution ON {schema}.keychain (parent_execution_id)
    WHERE parent_execution_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS idx_keychain_expires ON {schema}.keychain (expires_at);
CREATE INDEX IF NOT EXISTS idx_keychain_catalog ON {schema}.keychain (catalog_id);
"""


async def create_noetl_tables(conn, schema: str = "noetl") -> None:
    """NoETL's tables in `schema`, as NoETL's own installation creates them (idempotent, as NoETL's DDL is)."""
    await conn.execute(NOETL_DDL.format(schema=schema))


async def register_playbook(conn, schema: str, catalog_id: int, path: str, content: str, version: int = 1) -> None:
    """What NoETL's `catalog register` writes: a row with the YAML text, of kind `playbook`."""
    await conn.execute(f"INSERT INTO {schema}.catalog (catalog_id, path, version, kind, content) "
                       "VALUES ($1, $2, $3, 'playbook', $4)", catalog_id, path, version, content)


async def record_event(conn, schema: str, row: dict) -> None:
    """A NoETL event record (devtools.noetl_samples.record) as NoETL's server inserts it into its event table."""
    import json

    await conn.execute(
        f"INSERT INTO {schema}.event (execution_id, catalog_id, event_id, parent_event_id, parent_execution_id, "
        "event_type, node_id, node_name, node_type, status, context, result, meta) "
        "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11::jsonb, $12::jsonb, $13::jsonb)",
        row["execution_id"], row["catalog_id"], row["event_id"], row["parent_event_id"], row["parent_execution_id"],
        row["event_type"], row["node_id"], row["node_name"], row["node_type"], row["status"],
        *(None if row[c] is None else json.dumps(row[c]) for c in ("context", "result", "meta")))

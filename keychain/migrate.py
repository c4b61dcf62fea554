"""Apply the SQL migrations in order, once, under an advisory lock (two processes may migrate at the same time)."""

from __future__ import annotations

import logging

import asyncpg

from .errors import ConfigurationError
from .queries import migrations

log = logging.getLogger(__name__)

# An arbitrary constant, the same in every process, that names "the keychain's migration lock".
MIGRATION_LOCK_ID = 0x6B6579636861696E  # "keychain"


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def migrate(conn: asyncpg.Connection, schema: str) -> list[int]:
    """Bring `schema` up to date; returns the versions this call applied. Refuses (ConfigurationError, before it
    creates anything) a schema that holds another program's tables."""
    applied_now: list[int] = []
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_ID)
    try:
        refusal = await foreign_schema(conn, schema)
        if refusal is not None:
            raise ConfigurationError(refusal)
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(schema)}")
        await conn.execute(f"SET search_path TO {quote_ident(schema)}")
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS keychain_schema_migrations (
                   version INTEGER PRIMARY KEY,
                   name TEXT NOT NULL,
                   applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"""
        )
        done = {row["version"] for row in await conn.fetch("SELECT version FROM keychain_schema_migrations")}
        for migration in migrations():
            if migration.version in done:
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO keychain_schema_migrations (version, name) VALUES ($1, $2)",
                    migration.version,
                    migration.name,
                )
            log.info("applied migration %04d_%s to schema %s", migration.version, migration.name, schema)
            applied_now.append(migration.version)
    finally:
        await conn.execute("RESET search_path")
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_ID)
    return applied_now


async def foreign_schema(conn: asyncpg.Connection, schema: str) -> str | None:
    """Why this project must not create its tables in `schema` (one line saying what to set), or None. The schema
    is ours when it is empty or these migrations ran there; a schema with another program's tables is not (a
    workflow engine's own schema may hold a `keychain` table of its own, under our table's name)."""
    tables = [row["relname"] for row in await conn.fetch(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = $1 AND c.relkind IN ('r', 'p') ORDER BY c.relname", schema)]
    if not tables or "keychain_schema_migrations" in tables:
        return None
    shown = ", ".join(tables[:4]) + (", ..." if len(tables) > 4 else "")
    return (f"schema {schema!r} holds another program's tables ({shown}); nothing was created: set KEYCHAIN_SCHEMA "
            "to a schema of this project's own (for example keychain_warmer)")

import asyncio

import asyncpg

from keychain.migrate import migrate
from keychain.queries import migrations, parse_named_statements, queries


async def test_migrations_are_idempotent_and_safe_concurrently(settings):
    conns = [await asyncpg.connect(settings.dsn) for _ in range(5)]
    try:
        applied = await asyncio.gather(*[migrate(conn, settings.schema_name) for conn in conns])
        everything = [m.version for m in migrations()]
        assert sorted(v for run in applied for v in run) == everything  # each applied exactly once
        assert await migrate(conns[0], settings.schema_name) == []
        recorded = await conns[0].fetch(
            f"SELECT version FROM {settings.schema_name}.keychain_schema_migrations ORDER BY version"
        )
        assert [r["version"] for r in recorded] == everything
        assert await conns[0].fetchval("SHOW search_path") != settings.schema_name  # left as it was
    finally:
        for conn in conns:
            await conn.close()


async def test_every_named_statement_prepares(keychain):
    async with keychain.pool.acquire() as conn:
        for sql in queries().values():
            await conn.prepare(sql)


def test_named_statement_file_format():
    parsed = parse_named_statements("-- name: a\nSELECT 1;\n\n-- name: b\n-- why\nSELECT 2;\n")
    assert parsed == {"a": "SELECT 1;", "b": "-- why\nSELECT 2;"}

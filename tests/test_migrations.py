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


async def test_refusals_written_before_0010_are_reached_by_a_notice_of_any_project(keychain):
    """0010: rows of a refusal (Secret Manager answered no name, so no project number) written before notices were
    matched by project get "*" in their names, as refusals written since have; resolved rows are left as they were."""
    from keychain.invalidation import Selection
    from keychain.model import Provenance
    from keychain.refs import SecretRef

    ref = SecretRef.parse("projects/my-proj/secrets/s0010")
    await keychain.put("refused", "x", sources=[Provenance(ref, None)])
    await keychain.put("resolved", "y", sources=[Provenance(ref, "projects/42/secrets/s0010/versions/3")])
    await keychain.pool.execute(  # as 0001..0009 wrote a refusal's names
        "UPDATE keychain SET sources = jsonb_set(sources, '{0,names}', '[\"projects/my-proj/secrets/s0010\"]') "
        "WHERE credential_name = 'refused'")
    async with keychain.pool.acquire() as conn, conn.transaction():
        await conn.execute(f"SET LOCAL search_path TO {keychain.settings.schema_name}")
        await conn.execute(next(m for m in migrations() if m.version == 10).sql)
    names = {r["credential_name"]: r["names"] for r in await keychain.pool.fetch(
        "SELECT credential_name, sources->0->'names' AS names FROM keychain")}
    assert names == {"refused": '["projects/my-proj/secrets/s0010", "*"]',
                     "resolved": '["projects/my-proj/secrets/s0010", "projects/42/secrets/s0010"]'}
    # a notice for the secret in project 7: the refusal might be that project's, the resolved row is project 42's
    assert await keychain.maintenance.invalidate(Selection.of(secret="projects/7/secrets/s0010")) == 1
    assert await keychain.maintenance.invalidate(Selection.of(secret="projects/42/secrets/s0010")) == 1

"""The noetl target against NoETL's own tables as NoETL defines them (devtools/noetl_schema.py), read the way NoETL's
unmodified server reads them (devtools/noetl_server.py): its cache keys, its expiry check, its envelope under both
key-encryption key providers; rotation, purge, sweep and the warmer's accounting, in process."""

import asyncio
import base64
import json

import asyncpg

from devtools.noetl_samples import as_message, finish_record, record, rust_playbook_started
from devtools.noetl_schema import register_playbook
from keychain.invalidation import Selection
from keychain import metrics as library_metrics
from streams import metrics
from streams.batches import Record

from .conftest import make_settings
from .test_rotation import notice

from .noetl_harness import PLAYBOOK, PROJECT, Noetl, calls, counts, warm_parts


async def test_a_start_record_warms_the_rows_noetl_server_reads_as_hits(parts, noetl, sm, noetl_secrets, execution_id):
    warmer, _ = parts
    skipped_before = counts(metrics.NOETL_SKIPPED_ALIASES)
    result = await warmer.handle([await noetl.started(execution_id)])
    assert (result.started, len(result.dead)) == (1, 0)
    key = f"openai_token:{noetl.catalog_id}:{execution_id}"
    row = await noetl.row(key)
    # the row NoETL's server itself would write on a miss, every column its row model reads non-NULL
    assert (row["keychain_name"], row["catalog_id"], row["credential_type"], row["cache_type"], row["scope_type"],
            row["execution_id"], row["access_count"], row["auto_renew"]) == (
        "openai_token", noetl.catalog_id, "secret", "secret", "local", execution_id, 0, False)
    envelope = json.loads(row["data_encrypted"])
    assert list(envelope) == ["v", "alg", "ct", "dek"] and envelope["dek"]["p"] == "local"
    assert noetl_secrets["mapped"] not in row["data_encrypted"]
    answer = await noetl.server.get_credential("openai_token", execution_id)
    assert answer.source == "keychain" and answer.value == {"api_key": f"value-of-{noetl_secrets['mapped']}",
                                                            "org": f"value-of-{noetl_secrets['org']}"}
    plain = await noetl.server.get_credential(noetl_secrets["plain"], execution_id)  # no map: the alias names the secret
    assert (plain.source, plain.value) == ("keychain", f"value-of-{noetl_secrets['plain']}")
    assert (await noetl.row(key))["access_count"] == 1 and noetl.server.provider_fetches == 0
    assert await noetl.rows() == 2  # only the two aliases NoETL's server resolves through Secret Manager
    skipped = counts(metrics.NOETL_SKIPPED_ALIASES)
    for reason in ("credential_table", "other_provider", "no_provider", "unresolved"):
        assert skipped.get(reason, 0) == skipped_before.get(reason, 0) + 1, reason
    assert calls(sm, noetl_secrets) == 3  # one call per secret


async def test_a_thousand_executions_of_one_playbook_cost_a_call_per_secret(parts, noetl, sm, noetl_secrets, execution_id):
    """NoETL alone: one call per alias field per execution (3 x 30 here); with the warmer: one per secret."""
    warmer, _ = parts
    executions = [execution_id + i for i in range(30)]
    await warmer.handle([await noetl.started(e) for e in executions])
    assert await noetl.rows() == 60
    answers = [await noetl.server.get_credential("openai_token", e) for e in executions]
    assert {a.source for a in answers} == {"keychain"} and noetl.server.provider_fetches == 0
    assert calls(sm, noetl_secrets) == 3


async def test_a_redelivered_start_writes_nothing_and_a_finished_execution_gets_no_rows(parts, noetl, sm,
                                                                                       execution_id):
    warmer, _ = parts
    start = await noetl.started(execution_id)
    await warmer.handle([start])
    before = (await noetl.row(f"openai_token:{noetl.catalog_id}:{execution_id}"))["data_encrypted"]
    await warmer.handle([start])  # a redelivery: already warm
    assert (await noetl.row(f"openai_token:{noetl.catalog_id}:{execution_id}"))["data_encrypted"] == before
    finished = execution_id + 1
    late_start = await noetl.started(finished)
    await warmer.handle([Record(*as_message(finish_record(finished, noetl.catalog_id))), late_start])
    assert await noetl.rows() == 2  # the finished execution's start came after its finish: fenced


async def test_a_rotation_reaches_noetl_rows_even_those_its_server_wrote_again(parts, noetl, sm, noetl_secrets,
                                                                              execution_id):
    warmer, invalidator = parts
    await warmer.handle([await noetl.started(execution_id)])
    key = f"openai_token:{noetl.catalog_id}:{execution_id}"
    # NoETL's server writes the row again itself (a miss: it expired)
    await noetl.db.execute(f"UPDATE {noetl.schema}.keychain SET expires_at = now() - interval '1 s' "
                           "WHERE cache_key = $1", key)
    again = await noetl.server.get_credential("openai_token", execution_id)
    assert again.source == "provider" and noetl.server.provider_fetches == 2
    sm.add_version(noetl_secrets["mapped"], "rotated-mapped")
    applied = await invalidator.apply(notice("SECRET_VERSION_ADD", noetl_secrets["mapped"], "2"))
    assert applied.changed == 1 and applied.refreshed == 1  # found through what the cache key was resolved from
    answer = await noetl.server.get_credential("openai_token", execution_id)
    assert answer.source == "keychain" and answer.value["api_key"] == "rotated-mapped"
    # a version disabled: every row that might hold it stops being served at once, and is refreshed
    sm.add_version(noetl_secrets["plain"], "plain-v2")
    sm.set_state(f"projects/{PROJECT}/secrets/{noetl_secrets['plain']}/versions/1", "DISABLED")
    applied = await invalidator.apply(notice("SECRET_VERSION_DISABLE", noetl_secrets["plain"], "1"))
    assert applied.changed == 1
    plain = await noetl.server.get_credential(noetl_secrets["plain"], execution_id)
    assert (plain.source, plain.value) == ("keychain", "plain-v2")
    assert noetl.server.provider_fetches == 2  # the server never had to fetch for them


async def test_drop_mode_deletes_noetl_rows_on_a_rotation(stack, noetl_settings, keychain, noetl, sm, noetl_secrets,
                                                          execution_id):
    dropping = noetl_settings.model_copy(update={"rewarm_mode": "drop"})
    warmer, invalidator, targets = await warm_parts(dropping, keychain)
    try:
        await warmer.handle([await noetl.started(execution_id)])
        applied = await invalidator.apply(notice("SECRET_DELETE", noetl_secrets["mapped"]))
        assert applied.changed == 1 and applied.refreshed == 0
        assert await noetl.row(f"openai_token:{noetl.catalog_id}:{execution_id}") is None
    finally:
        for target in targets:
            await target.close()


async def test_a_finish_purges_the_execution_and_its_children_and_tells_what_was_used(parts, noetl, sm, noetl_secrets,
                                                                                      execution_id):
    warmer, _ = parts
    parent, child, unseen = execution_id, execution_id + 1, execution_id + 2
    await warmer.handle([await noetl.started(parent), await noetl.started(child, parent=parent)])
    await noetl.started(unseen, parent=parent)  # the warmer never sees this start: NoETL's server fetches itself
    assert (await noetl.row(f"openai_token:{noetl.catalog_id}:{child}"))["parent_execution_id"] == parent
    await noetl.server.get_credential("openai_token", parent)  # read: a first use served from the cache
    assert (await noetl.server.get_credential("openai_token", unseen)).source == "provider"
    await noetl.db.execute(f"UPDATE {noetl.schema}.keychain SET parent_execution_id = $1 WHERE execution_id = $2",
                           parent, unseen)  # (NoETL's server does not write it; a row the warmer never wrote)
    rows_before, saved_before = counts(metrics.NOETL_ROWS_SEEN), counts(metrics.NOETL_CALLS_SAVED)
    purged_before = counts(library_metrics.PURGED_ROWS)
    result = await warmer.handle([Record(*as_message(finish_record(parent, noetl.catalog_id)))])
    assert result.rows_purged == 5 and await noetl.rows() == 0  # by execution_id and by parent_execution_id
    rows = counts(metrics.NOETL_ROWS_SEEN)
    assert rows.get("warmed_read", 0) - rows_before.get("warmed_read", 0) == 1
    assert rows.get("warmed_unread", 0) - rows_before.get("warmed_unread", 0) == 3
    assert rows.get("server_written", 0) - rows_before.get("server_written", 0) == 1
    assert counts(metrics.NOETL_CALLS_SAVED)["total"] - saved_before.get("total", 0) == 2  # the map's two fields
    assert sum(counts(library_metrics.PURGED_ROWS).values()) - sum(purged_before.values()) == 5
    assert await warmer.keychain.pool.fetchval("SELECT count(*) FROM keychain_copy") == 0  # forgotten with them


async def test_the_sweep_deletes_expired_rows_whoever_wrote_them_but_never_an_auto_renew_row(
        parts, keychain, noetl, execution_id):
    warmer, _ = parts
    await warmer.handle([await noetl.started(execution_id), await noetl.started(execution_id + 1)])
    s = noetl.schema
    await noetl.db.execute(f"UPDATE {s}.keychain SET expires_at = now() - interval '1 minute' WHERE execution_id = $1",
                           execution_id)
    await noetl.db.execute(  # a token NoETL renews from its renew_config, and one its server wrote itself
        f"INSERT INTO {s}.keychain (cache_key, keychain_name, catalog_id, credential_type, cache_type, scope_type, "
        "data_encrypted, expires_at, auto_renew, renew_config) VALUES "
        "('renewed:1:global', 'renewed', $1, 'oauth2', 'token', 'global', 'x', now() - interval '1 hour', true, '{}'),"
        "('server:1:9', 'server', $1, 'secret', 'secret', 'local', 'x', now() - interval '1 hour', false, NULL)",
        noetl.catalog_id)
    target = next(t for t in warmer.targets if t.name == "noetl")
    assert await target.sweep() == 3
    left = {r["cache_key"] for r in await noetl.db.fetch(f"SELECT cache_key FROM {s}.keychain")}
    assert left == {"renewed:1:global", *(f"{a}:{noetl.catalog_id}:{execution_id + 1}"
                                          for a in ("openai_token", noetl.names["plain"]))}


async def test_the_noetl_envelope_under_cloud_kms(stack, schema, key_spec, keychain, noetl_db, noetl_schema, kms_server,
                                                  sm, noetl_secrets, unique, execution_id):
    key = kms_server.create_key(f"projects/{PROJECT}/locations/global/keyRings/noetl/cryptoKeys/kek-{unique}")
    settings = make_settings(stack, schema, key_spec, target="noetl", catalog_schema=noetl_schema,
                             noetl_kms_provider="gcp-kms", noetl_gcp_kms_key=key, kms_endpoint=kms_server.address,
                             google_cloud_project=PROJECT)
    catalog_id = execution_id + 900
    await register_playbook(noetl_db, noetl_schema, catalog_id, "tests/noetl/keychain",
                            PLAYBOOK.format(project=PROJECT, **noetl_secrets))
    noetl = Noetl(noetl_db, noetl_schema, settings, noetl_secrets, catalog_id)
    warmer, _, targets = await warm_parts(settings, keychain)
    try:
        await warmer.handle([await noetl.started(e) for e in (execution_id, execution_id + 1, execution_id + 2)])
        kms_server.rotate(key)
        await warmer.handle([await noetl.started(execution_id + 3)])
    finally:
        for target in targets:
            await target.close()
    rows = await noetl_db.fetch(f"SELECT cache_key, data_encrypted FROM {noetl_schema}.keychain ORDER BY cache_key")
    deks = [json.loads(r["data_encrypted"])["dek"] for r in rows]
    assert len(rows) == 8 and {(d["p"], d["kid"]) for d in deks} == {("gcp-kms", key)}
    assert {d["kv"] for d in deks} <= {"1", "2"} and len({d["ct"] for d in deks}) == 8  # a data key per row
    for e in (execution_id, execution_id + 3):  # opened as NoETL's server opens them: Cloud KMS Decrypt
        answer = await noetl.server.get_credential("openai_token", e)
        assert answer.source == "keychain" and answer.value["api_key"] == f"value-of-{noetl_secrets['mapped']}"
    assert not any(base64.b64decode(d["ct"]) in kms_server.plaintexts for d in deks)


async def test_noetl_target_refuses_to_start_without_the_key_its_provider_needs(cli_env):
    import subprocess
    import sys

    for extra, needed in (({"NOETL_KMS_PROVIDER": "local"}, "NOETL_ENCRYPTION_KEY"),
                          ({"NOETL_KMS_PROVIDER": "gcp-kms"}, "NOETL_GCP_KMS_KEY"),
                          ({"NOETL_ENCRYPTION_KEY": "bm90LTMyLWJ5dGVz"}, "32 bytes")):
        env = {**cli_env, "KEYCHAIN_TARGET": "noetl", **extra}
        result = subprocess.run([sys.executable, "-m", "streams", "worker"], env=env, capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 1 and needed in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


async def test_migrate_never_touches_noetls_tables(stack, settings, key_spec, noetl_db, noetl_schema, unique):
    """`keychain migrate` pointed at NoETL's schema stops with one line and creates nothing; pointed at a schema of
    its own beside NoETL's, it leaves NoETL's tables as they were; and NoETL installs beside ours."""
    import subprocess
    import sys

    from devtools.noetl_schema import create_noetl_tables

    def shape(schema: str) -> str:
        return ("SELECT string_agg(c.relname || '.' || coalesce(a.attname, '') || ':' || coalesce(a.atttypid::text, ''), "
                "',' ORDER BY c.relname, a.attnum) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                f"LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 WHERE n.nspname = '{schema}'")

    before = await noetl_db.fetchval(shape(noetl_schema))
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("KEYCHAIN_")}
    env.update(KEYCHAIN_DSN=settings.dsn, KEYCHAIN_KEYS=key_spec)
    into_noetl = subprocess.run([sys.executable, "-m", "keychain", "migrate"], capture_output=True, text=True,
                                env={**env, "KEYCHAIN_SCHEMA": noetl_schema}, timeout=60)
    assert into_noetl.returncode == 1 and "KEYCHAIN_SCHEMA" in into_noetl.stderr
    assert len(into_noetl.stderr.strip().splitlines()) == 1 and "Traceback" not in into_noetl.stderr
    assert await noetl_db.fetchval(shape(noetl_schema)) == before  # no keychain_schema_migrations left behind
    beside = subprocess.run([sys.executable, "-m", "keychain", "migrate"], capture_output=True, text=True,
                            env={**env, "KEYCHAIN_SCHEMA": f"kw_{unique}"}, timeout=60)
    assert beside.returncode == 0, beside.stderr
    assert await noetl_db.fetchval(shape(noetl_schema)) == before
    # the other order, in a database of its own: ours first, with every default, then NoETL's installation
    await noetl_db.execute(f"CREATE DATABASE nd_{unique}")
    try:
        dsn = settings.dsn.replace("/postgres?", f"/nd_{unique}?")
        ours_first = subprocess.run([sys.executable, "-m", "keychain", "migrate"], capture_output=True, text=True,
                                    env={**env, "KEYCHAIN_DSN": dsn}, timeout=60)
        assert ours_first.returncode == 0, ours_first.stderr
        fresh = await asyncpg.connect(dsn)
        try:
            await create_noetl_tables(fresh, "noetl")  # NoETL's own schema, as NoETL installs it: it can
            columns = await fresh.fetchval("SELECT array_agg(column_name::text) FROM information_schema.columns "
                                           "WHERE table_schema = 'noetl' AND table_name = 'keychain'")
            assert "cache_key" in columns and "parent_execution_id" in columns
        finally:
            await fresh.close()
    finally:
        await noetl_db.execute(f"DROP DATABASE nd_{unique} WITH (FORCE)")


async def test_plan_shows_the_cache_keys_and_a_shadowed_alias(stack, settings, key_spec, noetl, noetl_db, noetl_schema,
                                                              noetl_secrets, execution_id):
    import subprocess
    import sys

    from .streams_harness import process_env

    await noetl_db.execute(f"INSERT INTO {noetl_schema}.credential (id, name, type, data_encrypted) "
                           "VALUES (1, $1, 'secret', 'x')", noetl_secrets["plain"])  # NoETL's server serves this one
    row = rust_playbook_started(execution_id, noetl.catalog_id, "tests/noetl/keychain",
                                {"api_secret": f"projects/{PROJECT}/secrets/{noetl_secrets['mapped']}"})
    env = {**process_env(stack, settings, key_spec), "KEYCHAIN_TARGET": "both", "KEYCHAIN_CATALOG_SCHEMA": noetl_schema,
           "GOOGLE_CLOUD_PROJECT": PROJECT}
    result = subprocess.run([sys.executable, "-m", "streams", "plan", "-"], input=json.dumps(row), env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert [r["cache_key"] for r in plan["noetl"]["rows"]] == [f"openai_token:{noetl.catalog_id}:{execution_id}"]
    assert {"where": noetl_secrets["plain"], "reason": "credential_table"} in plan["noetl"]["skipped"]
    assert {"where": "pg_creds", "reason": "credential_table"} in plan["noetl"]["skipped"]
    assert plan["rows"] and plan["skipped"]  # and our own table's plan beside it


def test_noetl_record_parent_execution_id_is_read():
    from streams.events import parse_event

    row = record(7, 3, "playbook_started", context={"workload": {}})
    row["parent_execution_id"] = 5
    assert parse_event(None, json.dumps(row).encode(), max_bytes=10**6).parent_execution_id == 5


async def test_reconciliation_and_the_cli_reach_noetl_rows(parts, noetl, keychain, sm, noetl_secrets, execution_id):
    warmer, invalidator = parts
    await warmer.handle([await noetl.started(execution_id)])
    # a version added whose notice never arrived: reconciliation finds the rows that hold the older one
    sm.add_version(noetl_secrets["plain"], "plain-v2")
    assert await invalidator.reconcile() == 1
    plain = await noetl.server.get_credential(noetl_secrets["plain"], execution_id)
    assert (plain.source, plain.value) == ("keychain", "plain-v2")
    # the CLI's invalidation (the library alone): NoETL's rows are refreshed by the worker's next maintenance round
    sm.add_version(noetl_secrets["mapped"], "mapped-v2")
    await keychain.maintenance.invalidate(Selection.of(secret=f"projects/{PROJECT}/secrets/{noetl_secrets['mapped']}"))
    assert await invalidator.refresh_stale() == 1
    answer = await noetl.server.get_credential("openai_token", execution_id)
    assert (answer.source, answer.value["api_key"]) == ("keychain", "mapped-v2")
    assert noetl.server.provider_fetches == 0


async def test_only_a_row_served_as_it_was_warmed_counts_as_a_first_use_from_the_cache(parts, noetl, noetl_secrets,
                                                                                      execution_id):
    """NoETL's server counts a read before it opens the row: a row it could not open (it then fetched and wrote the
    row again itself) is not a first use served from the cache, nor a Secret Manager call saved."""
    import base64
    import os

    from streams.targets.noetl.envelope import seal
    from streams.targets.noetl.kek import LocalKek

    warmer, _ = parts
    await warmer.handle([await noetl.started(execution_id)])
    plain_key = f"{noetl.names['plain']}:{noetl.catalog_id}:{execution_id}"
    other_kek = LocalKek(base64.b64encode(os.urandom(32)).decode())  # not the server's
    unopenable = seal("sealed-for-someone-else", await other_kek.wrap(os.urandom(32)))
    await noetl.db.execute(f"UPDATE {noetl.schema}.keychain SET data_encrypted = $1 WHERE cache_key = $2",
                           unopenable, plain_key)
    assert (await noetl.server.get_credential(noetl.names["plain"], execution_id)).source == "provider"
    assert (await noetl.row(plain_key))["access_count"] == 1  # counted, though it could not be opened
    assert (await noetl.server.get_credential("openai_token", execution_id)).source == "keychain"
    rows_before, saved_before = counts(metrics.NOETL_ROWS_SEEN), counts(metrics.NOETL_CALLS_SAVED)
    await warmer.handle([Record(*as_message(finish_record(execution_id, noetl.catalog_id)))])
    rows = counts(metrics.NOETL_ROWS_SEEN)
    assert rows.get("warmed_read", 0) - rows_before.get("warmed_read", 0) == 1  # openai_token only
    assert rows.get("server_written", 0) - rows_before.get("server_written", 0) == 1  # the row it wrote again
    assert rows.get("warmed_unread", 0) - rows_before.get("warmed_unread", 0) == 0
    assert counts(metrics.NOETL_CALLS_SAVED)["total"] - saved_before.get("total", 0) == 2  # the map's two fields


async def test_a_late_notice_for_a_version_a_row_already_holds_keeps_it_served(parts, noetl, sm, noetl_secrets,
                                                                             execution_id):
    """The warm ran after version 2 was added and its notice comes after: the rows already hold version 2 and stay
    served (no needless miss for NoETL's server). A row the server wrote again itself holds a version nobody knows:
    it is invalidated all the same. A newer version reaches them all."""
    warmer, invalidator = parts
    sm.add_version(noetl_secrets["mapped"], "mapped-v2")
    sm.add_version(noetl_secrets["plain"], "plain-v2")
    await warmer.handle([await noetl.started(execution_id)])
    plain_key = f"{noetl.names['plain']}:{noetl.catalog_id}:{execution_id}"
    await noetl.db.execute(f"UPDATE {noetl.schema}.keychain SET expires_at = now() - interval '1 s' "
                           "WHERE cache_key = $1", plain_key)
    assert (await noetl.server.get_credential(noetl.names["plain"], execution_id)).source == "provider"
    fetched = noetl.server.provider_fetches
    late = await invalidator.invalidate(notice("SECRET_VERSION_ADD", noetl_secrets["mapped"], "2").selection(),
                                        cause="SECRET_VERSION_ADD", refresh=False)
    assert late.changed == 0
    answer = await noetl.server.get_credential("openai_token", execution_id)
    assert (answer.source, answer.value["api_key"]) == ("keychain", "mapped-v2")
    rewritten = await invalidator.invalidate(notice("SECRET_VERSION_ADD", noetl_secrets["plain"], "2").selection(),
                                             cause="SECRET_VERSION_ADD", refresh=False)
    assert rewritten.changed == 1  # the server's own row: what it holds is unknown
    sm.add_version(noetl_secrets["mapped"], "mapped-v3")
    newer = await invalidator.apply(notice("SECRET_VERSION_ADD", noetl_secrets["mapped"], "3"))
    assert (newer.changed, newer.refreshed) == (1, 1)
    answer = await noetl.server.get_credential("openai_token", execution_id)
    assert (answer.source, answer.value["api_key"]) == ("keychain", "mapped-v3")
    assert noetl.server.provider_fetches == fetched


async def test_an_alias_a_credential_row_answers_is_never_warmed(parts, noetl, noetl_db, noetl_schema, sm,
                                                                 noetl_secrets, execution_id):
    """NoETL's server asks `noetl.credential` first, and a credential of the alias's name always wins
    (noetl/server v3.83.1 src/services/credential.rs): warming that alias would only cost a Secret Manager call."""
    warmer, _ = parts
    await noetl_db.execute(f"INSERT INTO {noetl_schema}.credential (id, name, type, data_encrypted) "
                           "VALUES (7, $1, 'secret', 'x')", noetl_secrets["plain"])
    skipped_before = counts(metrics.NOETL_SKIPPED_ALIASES).get("credential_table", 0)
    result = await warmer.handle([await noetl.started(execution_id)])
    assert (result.started, len(result.dead)) == (1, 0)
    assert await noetl.row(f"{noetl_secrets['plain']}:{noetl.catalog_id}:{execution_id}") is None
    assert await noetl.rows() == 1  # openai_token only
    assert sm.access_count(noetl_secrets["plain"]) == 0  # not fetched for nothing
    # `kind: credential` (pg_creds) and the shadowed alias: both answered by the credential table
    assert counts(metrics.NOETL_SKIPPED_ALIASES).get("credential_table", 0) == skipped_before + 2


async def test_a_grant_missing_in_noetls_database_never_undoes_our_own_invalidation(
        stack, schema, key_spec, keychain, noetl, noetl_db, noetl_schema, noetl_key, sm, noetl_secrets, unique,
        execution_id):
    """KEYCHAIN_TARGET=both, NoETL's tables over KEYCHAIN_CATALOG_DSN as a role that lost its UPDATE grant: a rotation
    stops and refreshes our own rows, is not dead-lettered, and NoETL's part is a refusal for good (database_refused),
    kept in the outbox until the grant is back."""
    from .noetl_harness import warm_parts

    role = f"warmer_{unique}"
    await noetl_db.execute(f"CREATE ROLE {role} LOGIN; GRANT USAGE ON SCHEMA {noetl_schema} TO {role}; "
                           f"GRANT SELECT ON {noetl_schema}.catalog, {noetl_schema}.credential, {noetl_schema}.event "
                           f"TO {role}; GRANT SELECT, INSERT, UPDATE, DELETE ON {noetl_schema}.keychain TO {role}")
    limited = stack.env["KEYCHAIN_DSN"].replace("postgres@", f"{role}@", 1)
    both = make_settings(stack, schema, key_spec, target="both", catalog_schema=noetl_schema, catalog_dsn=limited,
                         noetl_encryption_key=noetl_key, google_cloud_project=PROJECT)
    warmer, invalidator, targets = await warm_parts(both, keychain)
    try:
        await warmer.handle([await noetl.started(execution_id)])
        ours = await keychain.pool.fetchval("SELECT count(*) FROM keychain WHERE state = 'ready'")
        assert ours >= 1 and await noetl.rows() == 2
        await noetl_db.execute(f"REVOKE UPDATE ON {noetl_schema}.keychain FROM {role}")
        sm.add_version(noetl_secrets["mapped"], "rotated")
        result = await invalidator.handle([Record(None, notice("SECRET_VERSION_ADD", noetl_secrets["mapped"], "2")
                                                  .model_dump_json().encode())])
        assert (result.applied, result.dead) == (1, [])
        held = await keychain.maintenance.outbox.counts()
        assert (held["noetl"].waiting, held["noetl"].refused) == (1, 1)
        assert counts(metrics.TARGET_FAILURES).get("database_refused", 0) >= 1
        await invalidator.settled()  # the refresh that ran beside the notice has ended
        values = [await keychain.get(name, scope="global") for name in ("openai_token",)]
        assert values[0].value["api_key"] == "rotated"  # ours: stopped and refreshed, whatever NoETL's grant says
        await noetl_db.execute(f"GRANT UPDATE ON {noetl_schema}.keychain TO {role}")
        await keychain.pool.execute("UPDATE keychain_outbox SET next_attempt_at = now()")
        invalidator.deferred.kick("noetl")
        for _ in range(200):
            if not (await keychain.maintenance.outbox.counts()).get("noetl"):
                break
            await asyncio.sleep(0.05)
        assert not (await keychain.maintenance.outbox.counts()).get("noetl")
        row = await noetl.row(f"openai_token:{noetl.catalog_id}:{execution_id}")
        assert row["expires_at"] <= await noetl_db.fetchval("SELECT now()")  # NoETL's row stopped being served too
    finally:
        await invalidator.close()
        for target in targets:
            await target.close()
        await noetl_db.execute(f"DROP OWNED BY {role}; DROP ROLE {role}")

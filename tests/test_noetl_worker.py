"""NoETL as it really is, through the real worker: its event records (only a catalog id and the workload), its catalog
table with the playbook as YAML text, its step records in between, Debezium envelopes; and `python -m streams plan`."""

import json
import subprocess
import sys

from devtools.noetl_samples import (
    CACHE_SIMPLE, as_message, debezium, finish_record, keychain_secrets_yaml, python_playbook_initialized, register,
    rust_playbook_started, rust_workflow_initialized, step_records,
)
from .streams_harness import consume, wait_for

REF = "projects/test-project/secrets/{}/versions/latest"
SENTINEL = (None, b"{sentinel: not json")  # the last message: the DLQ holds it alone when nothing else was dead-lettered


def noetl_worker(streams, settings, **extra):
    """A worker that finds NoETL's catalog in this test's schema (as if NoETL's tables lived beside the keychain)."""
    return streams.start_worker(KEYCHAIN_CATALOG_SCHEMA=settings.schema_name, GOOGLE_CLOUD_PROJECT="test-project",
                                KEYCHAIN_CATALOG_WAIT_SECONDS="0.5", **extra)


async def dead_letters(streams, expected_at_least=1):
    return await consume(streams.bootstrap, streams.dlq, expected_at_least, timeout=20)


async def test_seed_playbook_as_noetl_ships_it_first_read_is_a_hit(streams, settings, db, keychain, sm, secret,
                                                                     execution_id):
    secret_id, value = secret
    ref = REF.format(secret_id)
    catalog_id = execution_id + 1
    await register(db, settings.schema_name, catalog_id, "test/cache_simple", CACHE_SIMPLE)
    noetl_worker(streams, settings)
    # The Rust server's two start records, then the Python engine's (another execution of the same playbook)
    await streams.send(
        as_message(rust_playbook_started(execution_id, catalog_id, "test/cache_simple", {"openai_secret_path": ref})),
        as_message(rust_workflow_initialized(execution_id, catalog_id)),
        as_message(python_playbook_initialized(execution_id + 2, catalog_id, "test/cache_simple",
                                               {"openai_secret_path": ref, "oauth_cred": "google_oauth"})),
    )
    for e in (execution_id, execution_id + 2):
        await wait_for(lambda: streams.rows(e), what="warm rows from the catalog's playbook")
        first = await keychain.get(ref, execution_id=e)  # what the playbook's first_openai_call asks
        assert first.outcome == "hit" and first.value == value
    assert sm.access_count(secret_id) == 1  # several start records and two executions: one fetch
    assert await streams.rows() == 2


async def test_keychain_secrets_entries_warm_under_their_names_globally(streams, settings, db, keychain, sm, unique,
                                                                         execution_id):
    names = {k: f"{k}-{unique}" for k in ("mapped", "plain", "cid", "csecret")}
    for secret_id in names.values():
        sm.create_secret(secret_id)
        sm.add_version(secret_id, f"value-of-{secret_id}")
    catalog_id = execution_id + 7
    await register(db, settings.schema_name, catalog_id, "tests/keychain/secrets", keychain_secrets_yaml(**names))
    noetl_worker(streams, settings)
    await streams.send(as_message(rust_playbook_started(execution_id, catalog_id, "tests/keychain/secrets", {})),
                       SENTINEL)
    await wait_for(lambda: _count(keychain, "SELECT count(*) FROM keychain WHERE scope_type = 'global'", 2),
                   what="the two global entries")
    token = await keychain.get("openai_token")
    assert token.outcome == "hit" and token.value == {"api_key": f"value-of-{names['mapped']}"}
    assert (await keychain.get(names["plain"])).value == f"value-of-{names['plain']}"
    await wait_for(lambda: _count(keychain, f"SELECT count(*) FROM keychain WHERE execution_id = {execution_id}", 3),
                   what="the execution's entries")
    assert (await keychain.get("legacy_local", execution_id=execution_id)).value == {
        "token": f"value-of-{names['mapped']}"}
    assert (await keychain.get(REF.format(names["cid"]), execution_id=execution_id)).value == f"value-of-{names['cid']}"
    dead = await dead_letters(streams)
    assert [m.value for m in dead] == [SENTINEL[1]]  # skipped declarations are not dead letters
    metrics = await _metrics(streams)
    for reason in ("oauth2", "other_provider", "google_id_token", "credential_table", "unresolved"):
        assert f'keychain_skipped_declarations_total{{reason="{reason}"}}' in metrics


async def test_a_mixed_stream_of_noetl_records_dead_letters_nothing_and_purges(streams, settings, db, keychain, sm,
                                                                               secret, execution_id):
    secret_id, _ = secret
    ref = REF.format(secret_id)
    catalog_id = execution_id + 3
    await register(db, settings.schema_name, catalog_id, "test/cache_simple", CACHE_SIMPLE)
    noetl_worker(streams, settings)
    records = [rust_playbook_started(execution_id, catalog_id, "test/cache_simple", {"openai_secret_path": ref}),
               rust_workflow_initialized(execution_id, catalog_id)]
    for step in ("start", "first_openai_call", "second_openai_call", "end"):
        records += step_records(execution_id, catalog_id, step)
    await streams.send(*[as_message(r) for r in records])
    await wait_for(lambda: streams.rows(execution_id), what="warm")
    await streams.send(as_message(finish_record(execution_id, catalog_id, "playbook.completed")), SENTINEL)
    await wait_for(lambda: _is_zero(streams.rows(execution_id)), what="purged on finish")
    dead = await dead_letters(streams)
    assert [m.value for m in dead] == [SENTINEL[1]]
    metrics = await _metrics(streams)
    assert 'keychain_events_total{kind="ignored"} 48.0' in metrics  # 4 steps x 12 record types, counted
    assert "command.issued" not in metrics  # never a raw event type as a label


async def test_debezium_envelopes_and_keys_warm_and_purge(streams, settings, db, keychain, sm, secret, execution_id):
    secret_id, value = secret
    ref = REF.format(secret_id)
    catalog_id = execution_id + 5
    await register(db, settings.schema_name, catalog_id, "test/cache_simple", CACHE_SIMPLE)
    noetl_worker(streams, settings)
    started = rust_playbook_started(execution_id, catalog_id, "test/cache_simple", {"openai_secret_path": ref})
    unwrapped = python_playbook_initialized(execution_id + 1, catalog_id, "test/cache_simple",
                                            {"openai_secret_path": ref})
    await streams.send(debezium(started), debezium(unwrapped, op="r", wrapped=False),
                       *[debezium(r) for r in step_records(execution_id, catalog_id, "start")])
    for e in (execution_id, execution_id + 1):
        await wait_for(lambda: streams.rows(e), what="warm through Debezium")
        assert (await keychain.get(ref, execution_id=e)).value == value
    await streams.send(debezium(finish_record(execution_id, catalog_id, "playbook_cancelled")), SENTINEL)
    await wait_for(lambda: _is_zero(streams.rows(execution_id)), what="purged on cancel")
    assert [m.value for m in await dead_letters(streams)] == [SENTINEL[1]]


async def test_a_playbook_missing_from_the_catalog_is_dead_lettered(streams, settings, db, keychain, sm, secret,
                                                                    execution_id):
    secret_id, _ = secret
    ref = REF.format(secret_id)
    await register(db, settings.schema_name, execution_id + 1, "test/cache_simple", CACHE_SIMPLE)
    noetl_worker(streams, settings)
    missing = rust_playbook_started(execution_id, execution_id + 999, "test/absent", {"openai_secret_path": ref})
    present = rust_playbook_started(execution_id + 2, execution_id + 1, "test/cache_simple", {"openai_secret_path": ref})
    await streams.send(as_message(missing), as_message(present))
    await wait_for(lambda: streams.rows(execution_id + 2), what="the other event of the batch warmed")
    dead = await dead_letters(streams)
    assert [dict(m.headers)["reason"] for m in dead] == [b"playbook_not_found"]
    assert dead[0].value == as_message(missing)[1]
    assert await streams.rows(execution_id) == 0


async def test_plan_prints_the_documented_json_for_noetls_shapes(settings, cli_env, db, keychain, unique, execution_id):
    catalog_id = execution_id + 11
    names = {k: f"{k}-{unique}" for k in ("mapped", "plain", "cid", "csecret")}
    await register(db, settings.schema_name, catalog_id, "tests/keychain/secrets", keychain_secrets_yaml(**names))
    env = {**cli_env, "KEYCHAIN_CATALOG_SCHEMA": settings.schema_name, "GOOGLE_CLOUD_PROJECT": "test-project",
           "KEYCHAIN_CATALOG_WAIT_SECONDS": "0.3"}

    def plan(message: bytes) -> tuple[int, dict]:
        done = subprocess.run([sys.executable, "-m", "streams", "plan", "-"], input=message, env=env,
                              capture_output=True, timeout=60)
        assert b"Traceback" not in done.stderr
        return done.returncode, json.loads(done.stdout)

    code, answer = plan(as_message(python_playbook_initialized(execution_id, catalog_id, "tests/keychain/secrets",
                                                               {}))[1])
    assert code == 0 and answer["event"] == "start" and answer["execution_id"] == execution_id
    rows = {r["name"]: r for r in answer["rows"]}
    assert rows["openai_token"] == {"name": "openai_token", "scope": "global",
                                    "refs": {"api_key": REF.format(f"mapped-{unique}")}}
    assert rows[f"plain-{unique}"]["refs"] == {"": REF.format(f"plain-{unique}")}
    assert rows["legacy_local"]["scope"] == "execution"
    assert {(s["where"], s["reason"]) for s in answer["skipped"]} == {
        ("amadeus", "oauth2"), ("aws_creds", "other_provider"), ("call.auth", "credential_table"),
        ("cloud_run_token", "google_id_token"), ("from_result", "unresolved"), ("query.auth", "credential_table")}

    code, answer = plan(debezium(step_records(execution_id, catalog_id, "s")[0])[1])
    assert (code, answer) == (0, {"event": "ignored", "execution_id": execution_id, "rows": [], "skipped": []})
    code, answer = plan(as_message(rust_workflow_initialized(execution_id, catalog_id))[1])
    assert (code, answer) == (0, {"event": "start", "execution_id": execution_id, "rows": [], "skipped": []})
    code, answer = plan(as_message(rust_playbook_started(execution_id, 1, "tests/absent", {}))[1])
    assert code == 1 and answer["dead_letter"] == "playbook_not_found" and answer["detail"]
    code, answer = plan(b"[1, 2]")
    assert code == 1 and answer["dead_letter"] == "invalid_event"


async def _count(keychain, query, expected):
    return await keychain.pool.fetchval(query) == expected


async def _is_zero(coroutine):
    return await coroutine == 0


async def _metrics(streams) -> str:
    import aiohttp

    port = streams.worker.env["KEYCHAIN_WEB_PORT"]
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/metrics") as answer:
        return await answer.text()

"""The real worker with KEYCHAIN_TARGET=both beside NoETL's own tables: NoETL's records on Kafka warm our table and
NoETL's (one Secret Manager call per secret for both), an operator's invalidation reaches NoETL's rows, a finish purges
them, and /stats says what the warmer saved NoETL's server."""

import json

from devtools.noetl_samples import as_message, finish_record
from devtools.noetl_schema import register_playbook

from .streams_harness import wait_for
from .conftest import make_settings
from .noetl_harness import PLAYBOOK, PROJECT, Noetl, calls
from .test_web import http

TOKEN = "noetl-admin-token"


async def test_the_worker_warms_noetls_keychain_beside_ours(streams, stack, settings, keychain, sm, noetl_secrets,
                                                            noetl_db, noetl_schema, noetl_key, execution_id):
    catalog_id = execution_id + 900
    await register_playbook(noetl_db, noetl_schema, catalog_id, "tests/noetl/keychain",
                            PLAYBOOK.format(project=PROJECT, **noetl_secrets))
    worker_settings = make_settings(stack, settings.schema_name, settings.keys.get_secret_value(),
                                    noetl_encryption_key=noetl_key)
    noetl = Noetl(noetl_db, noetl_schema, worker_settings, noetl_secrets, catalog_id)
    worker = streams.start_worker(KEYCHAIN_TARGET="both", KEYCHAIN_CATALOG_SCHEMA=noetl_schema,
                                  NOETL_ENCRYPTION_KEY=noetl_key, GOOGLE_CLOUD_PROJECT=PROJECT,
                                  KEYCHAIN_ADMIN_TOKEN=TOKEN, KEYCHAIN_SWEEP_INTERVAL_SECONDS="3600")
    port = int(worker.env["KEYCHAIN_WEB_PORT"])
    executions = [execution_id, execution_id + 1]
    await streams.send(*[(r.key, r.value) for r in [await noetl.started(e) for e in executions]])

    async def warmed() -> bool:
        return await noetl.rows() == 4 and bool(await keychain.get("openai_token"))

    await wait_for(warmed, what="both tables warmed")
    for e in executions:
        answer = await noetl.server.get_credential("openai_token", e)
        assert answer.source == "keychain" and answer.value["api_key"] == f"value-of-{noetl_secrets['mapped']}"
    ours = await keychain.get("openai_token")  # our table's row of the same playbook (a global entry)
    assert ours.value["api_key"] == f"value-of-{noetl_secrets['mapped']}"
    assert calls(sm, noetl_secrets) == 3 and noetl.server.provider_fetches == 0

    sm.add_version(noetl_secrets["mapped"], "rotated-by-the-operator")
    status, body = http(port, "/invalidate", method="POST", token=TOKEN,
                        body={"secret": f"projects/{PROJECT}/secrets/{noetl_secrets['mapped']}"})
    assert status == 200 and json.loads(body)["refreshed"] >= 2, body
    for e in executions:
        answer = await noetl.server.get_credential("openai_token", e)
        assert (answer.source, answer.value["api_key"]) == ("keychain", "rotated-by-the-operator")

    await streams.send(as_message(finish_record(execution_id, catalog_id)))

    async def purged() -> bool:
        return await noetl.rows() == 2

    await wait_for(purged, what="the finished execution's NoETL rows purged")
    status, body = http(port, "/stats")
    figures = json.loads(body)
    assert status == 200 and figures["targets"] == ["keychain", "noetl"]
    assert figures["noetl"]["rows_warmed_then_read"] == 1 and figures["noetl"]["rows_warmed_not_read"] == 1
    assert figures["noetl"]["secret_manager_calls_saved"] == 2
    assert figures["noetl"]["aliases_skipped"]["credential_table"] >= 2

"""One door for each job (issue 24): every invalidation reaches every target and is counted; a row a target could
not write is tried again and then dead-lettered, never counted as written; one deadline bounds a warm; the fetch
window holds no value past its time. NoETL's real shapes: its tables, its catalog row, its start record, its
server's reads (devtools/noetl_server.py)."""

import asyncio
import os
import subprocess
import sys

import grpc
import pytest

from keychain.invalidation import Selection
from keychain.model import Scope
from keychain.refs import SecretRef
from streams import metrics
from streams.resolve import Want

from .conftest import make_settings
from .streams_harness import process_env
from .noetl_harness import PLAYBOOK, PROJECT, Noetl, warm_parts
from devtools.noetl_schema import register_playbook


def invalidations(cause: str) -> float:
    return metrics.INVALIDATIONS.labels(cause)._value.get()


async def expired(noetl, key: str) -> bool:
    """As NoETL's server decides a miss: `expires_at < now` (read without counting a use)."""
    return await noetl.db.fetchval(f"SELECT expires_at <= now() FROM {noetl.schema}.keychain WHERE cache_key = $1",
                                   key)


@pytest.mark.parametrize("selection, reached", [
    (lambda names, e: Selection.of(everything=True), 2),
    (lambda names, e: Selection.of(credential="openai_token"), 1),
    (lambda names, e: Selection.of(execution_id=e), 2),
    (lambda names, e: Selection.of(secret=f"projects/{PROJECT}/secrets/{names['mapped']}"), 1),
], ids=["all", "credential", "execution", "secret"])
async def test_an_operators_invalidation_of_any_kind_reaches_noetls_rows(parts, noetl, selection, reached,
                                                                         noetl_secrets, execution_id):
    """POST /invalidate's every instruction (and the CLI's) is the worker's one path: NoETL's server stops being
    served the rows at once, the invalidation is counted, and the re-warm serves them again."""
    warmer, invalidator = parts
    await warmer.handle([await noetl.started(execution_id)])
    keys = [f"{alias}:{noetl.catalog_id}:{execution_id}" for alias in ("openai_token", noetl_secrets["plain"])]
    before = invalidations("operator")
    applied = await invalidator.invalidate(selection(noetl_secrets, execution_id), cause="operator", refresh=False)
    assert applied.changed == reached
    assert [await expired(noetl, key) for key in keys][:reached] == [True] * reached
    assert invalidations("operator") == before + 1
    assert await invalidator.refresh_stale() == reached  # the leader's next round (or at once, without refresh=False)
    answer = await noetl.server.get_credential("openai_token", execution_id)
    assert answer.source == "keychain" and noetl.server.provider_fetches == 0


async def test_the_cli_invalidation_takes_the_workers_path_to_noetls_rows(stack, noetl_settings, keychain, parts,
                                                                          noetl, noetl_secrets, key_spec,
                                                                          execution_id):
    warmer, _ = parts
    await warmer.handle([await noetl.started(execution_id)])
    env = {**process_env(stack, noetl_settings, key_spec), "KEYCHAIN_TARGET": "noetl",
           "KEYCHAIN_CATALOG_SCHEMA": noetl.schema, "GOOGLE_CLOUD_PROJECT": PROJECT,
           "NOETL_ENCRYPTION_KEY": noetl_settings.noetl_encryption_key.get_secret_value()}
    if noetl_settings.catalog_dsn:
        env["KEYCHAIN_CATALOG_DSN"] = noetl_settings.catalog_dsn
    result = subprocess.run([sys.executable, "-m", "keychain", "invalidate", "--all"], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == '{"invalidated": 2}'
    for alias in ("openai_token", noetl_secrets["plain"]):
        assert await expired(noetl, f"{alias}:{noetl.catalog_id}:{execution_id}")


async def test_a_row_that_cannot_be_sealed_is_retried_then_dead_lettered_and_kms_is_left_alone(
        stack, schema, key_spec, keychain, noetl_db, noetl_schema, kms_server, sm, noetl_secrets, unique,
        execution_id):
    """Cloud KMS down: NoETL's rows cannot be sealed. The warm tries them again until its deadline, then dead-letters
    the start record (`write_failed`): nothing is counted as written. Meanwhile Cloud KMS is asked a bounded number of
    times (the data keys' one refiller backs off; a take during the backoff asks nothing). Once KMS answers, the same
    record warms the rows."""
    key = kms_server.create_key(f"projects/{PROJECT}/locations/global/keyRings/noetl/cryptoKeys/down-{unique}")
    settings = make_settings(stack, schema, key_spec, target="noetl", catalog_schema=noetl_schema,
                             noetl_kms_provider="gcp-kms", noetl_gcp_kms_key=key, kms_endpoint=kms_server.address,
                             google_cloud_project=PROJECT, warm_deadline_seconds=2.0)
    catalog_id = execution_id + 900
    await register_playbook(noetl_db, noetl_schema, catalog_id, "tests/noetl/keychain",
                            PLAYBOOK.format(project=PROJECT, **noetl_secrets))
    noetl = Noetl(noetl_db, noetl_schema, settings, noetl_secrets, catalog_id)
    kms_server.fail("Encrypt", grpc.StatusCode.UNAVAILABLE, times=10**9)
    encrypts_before = kms_server.calls["Encrypt"]
    warmer, _, targets = await warm_parts(settings, keychain)
    try:
        started = await noetl.started(execution_id)
        result = await warmer.handle([started])
        assert [d.reason for d in result.dead] == ["write_failed"] and result.rows_written == 0
        assert await noetl.rows() == 0
        # 256 data keys wanted ahead, two rows to seal: without the backoff, every take started the whole refill
        assert kms_server.calls["Encrypt"] - encrypts_before <= 8 * 6
        kms_server.fail_next.pop("Encrypt", None)
        await asyncio.sleep(targets[0].data_keys.backoff_remaining)  # KMS is next asked when its backoff ends
        result = await warmer.handle([started])
        assert (result.dead, result.rows_written) == ([], 2) and await noetl.rows() == 2
    finally:
        kms_server.fail_next.pop("Encrypt", None)
        for target in targets:
            await target.close()
    answer = await noetl.server.get_credential("openai_token", execution_id)
    assert answer.source == "keychain" and answer.value["api_key"] == f"value-of-{noetl_secrets['mapped']}"


async def test_one_deadline_bounds_a_warm_however_long_secret_manager_holds_a_call(stack, settings, key_spec, keychain,
                                                                                    sm, secret, unique, execution_id):
    """Secret Manager holds the call (it never answers): the warm gives up at its deadline, with one attempt made,
    instead of waiting out SECRET_MANAGER_TIMEOUT_SECONDS (10 s) per attempt under the fetch lock."""
    from streams.warm import UNAVAILABLE, Warmer

    secret_id, _ = secret
    tuned = make_settings(stack, settings.schema_name, key_spec, warm_deadline_seconds=1.0)
    want = Want("held", Scope.of(execution_id=execution_id),
                ((None, SecretRef.parse(f"projects/test-project/secrets/{secret_id}")),))
    sm.hold(secret_id)
    try:
        refused, written = await asyncio.wait_for(Warmer(tuned, keychain).warm([want]), 6)
        assert (refused, written) == ({want: UNAVAILABLE}, 0)
        assert sm.access_count(secret_id, code=None) <= 1  # the held call: no second one under the lock
    finally:
        sm.release(secret_id)
    assert (await keychain.get("held", execution_id=execution_id)).outcome == "miss"


async def test_the_fetch_window_holds_no_value_past_its_time(stack, settings, key_spec, sm, secret):
    """An idle process holds no plaintext: a fetched value stays in memory for KEYCHAIN_SHARED_FETCH_SECONDS, then
    goes whether or not anyone fetched again; within the window it is reused (no second call)."""
    from keychain import Keychain, SecretManagerSource

    secret_id, value = secret
    short = make_settings(stack, settings.schema_name, key_spec, shared_fetch_seconds=0.5)
    async with Keychain(short, source=SecretManagerSource(short)) as kc:
        await kc.migrate()
        ref = SecretRef.parse(f"projects/test-project/secrets/{secret_id}")
        assert (await kc.fetcher.fetch(ref)).value.payload.decode() == value
        assert (await kc.fetcher.fetch(ref)).value.payload.decode() == value
        assert kc.fetcher.values_held == 1 and sm.access_count(secret_id) == 1
        for _ in range(100):
            if kc.fetcher.values_held == 0:
                break
            await asyncio.sleep(0.05)
        assert kc.fetcher.values_held == 0


def test_the_warmer_keeps_no_window_of_its_own():
    from streams.settings import WorkerSettings
    from streams.warm import Warmer

    assert "warm_fetch_window_seconds" not in WorkerSettings.model_fields
    assert not [name for name in vars(Warmer) if "recent" in name or "window" in name]
    assert os.environ.get("KEYCHAIN_WARM_FETCH_WINDOW_SECONDS") is None

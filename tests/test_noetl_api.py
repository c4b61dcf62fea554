"""The noetl target through NoETL's own keychain API (KEYCHAIN_NOETL_API_URL): the warmer holds no NoETL key, and
reaches NoETL's database as a role that may only read and delete there. NoETL's server is re-stated small: its
keychain API (devtools/noetl_api.py, behind a gateway asking for a bearer token) and its reads
(devtools/noetl_server.py), both under the server's own key."""

import asyncio
from types import SimpleNamespace

import asyncpg
import pytest

from devtools.noetl_api import NoetlKeychainApi
from devtools.noetl_samples import as_message, finish_record
from devtools.noetl_schema import register_playbook
from keychain.invalidation import Selection
from streams import metrics
from streams.batches import Record

from .conftest import make_settings
from .noetl_harness import PLAYBOOK, PROJECT, Noetl, counts, warm_parts
from .test_rotation import notice

TOKEN = "gateway-token"


@pytest.fixture
async def api_mode(stack, schema, key_spec, keychain, noetl_db, noetl_schema, noetl_key, noetl_secrets, execution_id,
                   unique):
    role = f"warmer_{unique}"  # the grants docs/noetl.md gives API mode, and no more
    await noetl_db.execute(f"CREATE ROLE {role} LOGIN")
    await noetl_db.execute(f"GRANT USAGE ON SCHEMA {noetl_schema} TO {role}; "
                           f"GRANT SELECT ON {noetl_schema}.catalog, {noetl_schema}.credential TO {role}; "
                           f"GRANT SELECT, DELETE, UPDATE (accessed_at) ON {noetl_schema}.keychain TO {role}")
    limited_dsn = stack.env["KEYCHAIN_DSN"].replace("postgres@", f"{role}@", 1)
    catalog_id = execution_id + 900
    await register_playbook(noetl_db, noetl_schema, catalog_id, "tests/noetl/keychain",
                            PLAYBOOK.format(project=PROJECT, **noetl_secrets))
    server_settings = make_settings(stack, schema, key_spec, noetl_encryption_key=noetl_key)  # NoETL's server's key
    noetl = Noetl(noetl_db, noetl_schema, server_settings, noetl_secrets, catalog_id)
    server_pool = await asyncpg.create_pool(stack.env["KEYCHAIN_DSN"], min_size=1, max_size=4)
    api = await NoetlKeychainApi(server_pool, noetl_schema, noetl.server.seal, token=TOKEN).start()
    settings = make_settings(stack, schema, key_spec, target="noetl", catalog_schema=noetl_schema,
                             catalog_dsn=limited_dsn, noetl_api_url=api.url, noetl_api_token=TOKEN,
                             google_cloud_project=PROJECT, warm_deadline_seconds=2.0)
    assert settings.noetl_encryption_key is None and settings.noetl_encryption_key_file is None
    warmer, invalidator, targets = await warm_parts(settings, keychain)
    try:
        yield SimpleNamespace(noetl=noetl, api=api, warmer=warmer, invalidator=invalidator, target=targets[0],
                              limited_dsn=limited_dsn)
    finally:
        for target in targets:
            await target.close()
        await api.stop()
        await server_pool.close()
        await noetl_db.execute(f"DROP OWNED BY {role}; DROP ROLE {role}")


def key(mode, alias: str, execution_id: int) -> str:
    return f"{alias}:{mode.noetl.catalog_id}:{execution_id}"


async def test_api_mode_warms_rows_noetls_server_sealed_and_serves_as_hits(api_mode, sm, noetl_secrets, execution_id):
    noetl, api = api_mode.noetl, api_mode.api
    assert api_mode.target.data_keys is None  # no key-encryption key, no data keys
    result = await api_mode.warmer.handle([await noetl.started(execution_id)])
    assert (result.started, result.rows_written, len(result.dead)) == (1, 2, 0)
    assert api.calls["POST"] == 2 and await noetl.rows() == 2
    row = await noetl.row(key(api_mode, "openai_token", execution_id))
    assert (row["scope_type"], row["execution_id"], row["credential_type"], row["cache_type"]) == (
        "local", execution_id, "secret", "secret")
    assert noetl_secrets["mapped"] not in row["data_encrypted"] and "value-of" not in row["data_encrypted"]
    answer = await noetl.server.get_credential("openai_token", execution_id)
    assert answer.source == "keychain" and answer.value == {"api_key": f"value-of-{noetl_secrets['mapped']}",
                                                            "org": f"value-of-{noetl_secrets['org']}"}
    plain = await noetl.server.get_credential(noetl_secrets["plain"], execution_id)
    assert (plain.source, plain.value) == ("keychain", f"value-of-{noetl_secrets['plain']}")
    assert noetl.server.provider_fetches == 0
    # a redelivered start: already warm, nothing asked of the API
    await api_mode.warmer.handle([await noetl.started(execution_id)])
    assert api.calls["POST"] == 2
    # and the warmer's role could not have written the rows itself
    conn = await asyncpg.connect(api_mode.limited_dsn)
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute(f"UPDATE {noetl.schema}.keychain SET expires_at = now()")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute(f"UPDATE {noetl.schema}.keychain SET data_encrypted = ''")
    finally:
        await conn.close()


async def test_api_mode_invalidates_through_the_api_and_warms_again(api_mode, sm, noetl_secrets, execution_id):
    noetl, api, invalidator = api_mode.noetl, api_mode.api, api_mode.invalidator
    await api_mode.warmer.handle([await noetl.started(execution_id)])
    sm.add_version(noetl_secrets["mapped"], "rotated-mapped")
    applied = await invalidator.apply(notice("SECRET_VERSION_ADD", noetl_secrets["mapped"], "2"))
    assert (applied.changed, applied.refreshed) == (1, 1) and (api.calls["DELETE"], api.calls["POST"]) == (1, 3)
    answer = await noetl.server.get_credential("openai_token", execution_id)
    assert answer.source == "keychain" and answer.value["api_key"] == "rotated-mapped"
    # an operator's invalidation of everything reaches every row, the server's own included, through the API
    await noetl.db.execute(f"DELETE FROM {noetl.schema}.keychain WHERE cache_key = $1",
                           key(api_mode, noetl_secrets["plain"], execution_id))
    assert (await noetl.server.get_credential(noetl_secrets["plain"], execution_id)).source == "provider"
    applied = await invalidator.invalidate(Selection.of(everything=True), cause="operator", refresh=False)
    assert applied.changed == 2 and api.calls["DELETE"] == 3 and await noetl.rows() == 0
    assert await invalidator.refresh_stale() == 2  # the running execution's rows are warmed again
    for alias in ("openai_token", noetl_secrets["plain"]):
        assert (await noetl.server.get_credential(alias, execution_id)).source == "keychain"
    assert noetl.server.provider_fetches == 1


async def test_api_mode_purges_and_sweeps_with_the_limited_role(api_mode, sm, noetl_secrets, execution_id):
    """The API writes no `parent_execution_id`: a child's rows are found through what the warmer wrote. The read
    figures come from the rows' fingerprints, as in direct mode."""
    noetl, warmer = api_mode.noetl, api_mode.warmer
    parent, child, other = execution_id, execution_id + 1, execution_id + 2
    await warmer.handle([await noetl.started(parent), await noetl.started(child, parent=parent),
                         await noetl.started(other)])
    assert await noetl.rows() == 6
    assert (await noetl.server.get_credential("openai_token", child)).source == "keychain"
    rows_before = counts(metrics.NOETL_ROWS_SEEN)
    result = await warmer.handle([Record(*as_message(finish_record(parent, noetl.catalog_id)))])
    assert result.rows_purged == 4 and await noetl.rows() == 2
    rows = counts(metrics.NOETL_ROWS_SEEN)
    assert rows.get("warmed_read", 0) - rows_before.get("warmed_read", 0) == 1
    assert rows.get("warmed_unread", 0) - rows_before.get("warmed_unread", 0) == 3
    await noetl.db.execute(f"UPDATE {noetl.schema}.keychain SET expires_at = now() - interval '1 s'")
    assert await api_mode.target.sweep() == 2 and await noetl.rows() == 0


async def waiting(mode) -> tuple[int, int]:
    """The noetl target's outbox: (entries waiting, of which refused for good)."""
    counts = (await mode.invalidator.keychain.maintenance.outbox.counts()).get("noetl")
    return (counts.waiting, counts.refused) if counts else (0, 0)


async def drained(mode, timeout: float = 30.0) -> None:
    import asyncio
    import time

    mode.invalidator.deferred.kick("noetl")
    deadline = time.monotonic() + timeout
    while await waiting(mode) != (0, 0):
        assert time.monotonic() < deadline, "the outbox was not drained"
        await asyncio.sleep(0.05)


async def test_api_mode_an_unreachable_api_fails_the_rows_and_never_holds_an_invalidation(api_mode, sm, noetl_secrets,
                                                                                         execution_id):
    """NoETL's API down: a warm's rows fail (then write_failed); an invalidation is never held, for this target or
    any other: it commits our part at once and leaves NoETL's in the outbox, applied (in order) once the API
    answers."""
    noetl, api, warmer, invalidator = api_mode.noetl, api_mode.api, api_mode.warmer, api_mode.invalidator
    api.fail = 10**9
    started = await noetl.started(execution_id)
    result = await warmer.handle([started])
    assert [d.reason for d in result.dead] == ["write_failed"] and result.rows_written == 0
    assert await noetl.rows() == 0
    api.fail = 0
    result = await warmer.handle([started])
    assert (result.dead, result.rows_written) == ([], 2)
    api.fail = 10**9  # the server down during two rotations: neither notice waits for it
    for secret in ("mapped", "plain"):
        applied = await invalidator.apply(notice("SECRET_DELETE", noetl_secrets[secret], message_id=f"m-{secret}"))
        assert applied.changed == 0  # nothing of ours to stop (the noetl target only); NoETL's part waits
    assert await waiting(api_mode) == (2, 0)
    assert metrics.TARGET_INVALIDATIONS_WAITING.labels("noetl")._value.get() == 2
    assert counts(metrics.TARGET_FAILURES).get("unavailable", 0) >= 1
    assert (await noetl.server.get_credential("openai_token", execution_id)).source == "keychain"  # not reached yet
    deletes = api.calls["DELETE"]
    api.fail = 0
    await drained(api_mode)
    assert api.calls["DELETE"] == deletes + 2 and await noetl.rows() == 0
    assert metrics.TARGET_INVALIDATIONS_WAITING.labels("noetl")._value.get() == 0
    # a notice redelivered after all that changes nothing and adds nothing to the outbox
    again = await invalidator.apply(notice("SECRET_DELETE", noetl_secrets["mapped"], message_id="m-mapped"))
    assert again.changed is None and await waiting(api_mode) == (0, 0)


async def test_api_mode_a_refusal_for_good_alerts_and_holds_nothing_else(api_mode, sm, noetl_secrets, execution_id,
                                                                         caplog):
    """An expired gateway token (401) is not an outage: each invalidation commits our part and goes on; NoETL's part is
    counted, logged once, kept in the gauge an operator pages on, and drained once the token is fixed."""
    import logging

    noetl, api, warmer, invalidator = api_mode.noetl, api_mode.api, api_mode.warmer, api_mode.invalidator
    await warmer.handle([await noetl.started(execution_id)])
    api.fail, api.fail_status = 10**9, 401
    with caplog.at_level(logging.ERROR, logger="streams.deferred"):
        for secret in ("mapped", "plain"):
            await invalidator.apply(notice("SECRET_DELETE", noetl_secrets[secret], message_id=f"r-{secret}"))
        for _ in range(100):  # the second entry is tried in the background (the target stopped answering)
            if (await waiting(api_mode))[1] == 2:
                break
            await asyncio.sleep(0.05)
    assert await waiting(api_mode) == (2, 2)
    assert metrics.TARGET_INVALIDATIONS_REFUSED.labels("noetl")._value.get() == 2
    assert sum("refuses invalidations (unauthorized" in r.getMessage() for r in caplog.records) == 1
    api.fail = 0  # the token is fixed; its entries are tried again (every 300 s: here, now)
    await invalidator.keychain.pool.execute("UPDATE keychain_outbox SET next_attempt_at = now()")
    await drained(api_mode)
    assert await noetl.rows() == 0 and metrics.TARGET_INVALIDATIONS_REFUSED.labels("noetl")._value.get() == 0

async def test_api_mode_a_write_that_fails_partway_leaves_no_row_a_rotation_cannot_find(api_mode, keychain, sm,
                                                                                        noetl_secrets, execution_id):
    """One of the two POSTs of a write fails: the write is `failed` (the warm tries it again), the other POST has
    ended before the write did (none is left running), and its row, which reached NoETL, was recorded as a copy
    before it was written: a rotation finds it and deletes it."""
    from streams.events import parse_event
    from streams.targets.base import Filled

    noetl, api, target, invalidator = api_mode.noetl, api_mode.api, api_mode.target, api_mode.invalidator
    record = await noetl.started(execution_id)
    event = parse_event(record.key, record.value, max_bytes=10**6)
    playbook = await api_mode.warmer.catalog.playbook_for(event)
    wants = target.plan(event, playbook).wants
    filled = [Filled(w, {str(ref): await keychain.fetcher.fetch(ref) for ref in w.refs}) for w in wants]
    api.fail = 1  # the first request to arrive answers 503; the other is written
    outcome = await target.write(filled)
    assert (len(outcome.written), len(outcome.failed)) == (0, 2)
    at_return = await noetl.rows()
    await asyncio.sleep(0.3)
    assert await noetl.rows() == at_return == 1  # every POST was answered before the write returned: none lands later
    copies = {r["copy_key"] for r in await keychain.pool.fetch("SELECT copy_key FROM keychain_copy")}
    assert copies == {w.cache_key for w in wants}  # both, recorded before either POST
    for secret in ("mapped", "plain"):  # a rotation of each (not re-warmed here, to see what it found)
        await invalidator.invalidate(Selection.of(secret=f"projects/{PROJECT}/secrets/{noetl_secrets[secret]}"),
                                     cause="operator", refresh=False)
    assert await noetl.rows() == 0  # whatever reached NoETL, a rotation found it

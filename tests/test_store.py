import asyncio
import logging

import asyncpg
import grpc
import pytest

from keychain.invalidation import Selection
from keychain import CachedFailure, DecryptionError, Keychain, SecretManagerSource, SecretNotFound, SecretUnavailable
from keychain.crypto import KeyRing
from keychain.model import Entry, Provenance, Scope
from keychain.refs import SecretRef

from .conftest import make_settings

PROJECT = "test-project"


def ref_of(secret_id: str, version: str = "latest") -> str:
    return f"projects/{PROJECT}/secrets/{secret_id}/versions/{version}"


async def test_put_then_get_is_scoped(keychain, execution_id):
    await keychain.put("openai", {"key": "v-exec"}, execution_id=execution_id)
    await keychain.put("openai", {"key": "v-global"})
    await keychain.put("openai", {"key": "v-session"}, session_id="sess-1")

    assert (await keychain.get("openai", execution_id=execution_id)).value == {"key": "v-exec"}
    assert (await keychain.get("openai")).value == {"key": "v-global"}
    assert (await keychain.get("openai", session_id="sess-1")).value == {"key": "v-session"}
    other = await keychain.get("openai", execution_id=execution_id + 1)
    assert not other and other.outcome == "miss"
    assert (await keychain.get("openai", session_id="sess-2")).outcome == "miss"


async def test_put_is_idempotent_one_row_per_identity(keychain, db, execution_id):
    for value in ("a", "b", "b"):
        await keychain.put("cred", value, execution_id=execution_id)
        await keychain.put("cred", value)
    rows = await db.fetch("SELECT scope_type, execution_id FROM keychain ORDER BY scope_type")
    assert [(r["scope_type"], r["execution_id"]) for r in rows] == [("execution", execution_id), ("global", None)]
    assert (await keychain.get("cred", execution_id=execution_id)).value == "b"


async def test_expired_rows_are_never_served(keychain, db, execution_id):
    await keychain.put("short", "v", execution_id=execution_id, ttl_seconds=3600)
    assert await keychain.get("short", execution_id=execution_id)
    await db.execute("UPDATE keychain SET expires_at = now() - interval '1 second'")
    lookup = await keychain.get("short", execution_id=execution_id)
    assert not lookup and lookup.outcome == "expired" and lookup.value is None


async def test_every_read_outcome_is_one_round_trip(settings, keychain, db, execution_id):
    """A hit, and a read that is not one, each ask the database once (the statement says why a row is not served).
    The statements are those the driver itself logs on the keychain's only connection."""
    reader = await Keychain(settings.model_copy(update={"pool_min_size": 1, "pool_max_size": 1,
                                                        "read_flush_seconds": 3600})).open()
    try:
        scope = Scope.of(execution_id=execution_id)
        await reader.rows.put_many([Entry(name, scope, "v") for name in ("ready", "expired", "stale")]
                              + [Entry("failed", scope, error_code="NOT_FOUND")])
        await db.execute("UPDATE keychain SET expires_at = now() - interval '1 second' "
                         "WHERE credential_name = 'expired'")
        await db.execute("UPDATE keychain SET state = 'stale' WHERE credential_name = 'stale'")
        statements = []
        async with reader.pool.acquire() as conn:
            conn.add_query_logger(lambda record: statements.append(record.query))
        outcomes = [(await reader.get(name, execution_id=execution_id)).outcome
                    for name in ("ready", "expired", "stale", "absent")]
        with pytest.raises(CachedFailure):
            await reader.get("failed", execution_id=execution_id)
        await asyncio.sleep(0)  # the driver hands each record to its loggers on the next turn of the loop
        assert outcomes == ["hit", "expired", "stale", "miss"]
        assert len(statements) == 5  # the hit's count is written later (KEYCHAIN_READ_FLUSH_SECONDS)
    finally:
        await reader.close()


async def test_ttl_sets_expiry(keychain, db, execution_id):
    await keychain.put("ttl", "v", execution_id=execution_id, ttl_seconds=120)
    row = await db.fetchrow("SELECT ttl_seconds, expires_at - created_at AS lifetime FROM keychain")
    assert row["ttl_seconds"] == 120 and row["lifetime"].total_seconds() == pytest.approx(120, abs=1)


async def test_hit_bookkeeping_proves_a_hit(keychain, db, execution_id):
    await keychain.put("cred", "v", execution_id=execution_id)
    before = await db.fetchrow("SELECT access_count, created_at, accessed_at FROM keychain")
    assert before["access_count"] == 0 and before["accessed_at"] == before["created_at"]
    await asyncio.sleep(0.01)
    for _ in range(3):
        assert await keychain.get("cred", execution_id=execution_id)
    await keychain.get("cred", execution_id=execution_id + 1)  # a miss elsewhere counts nothing here
    assert await keychain.flush_reads() == 1  # the hits are counted in memory, written for every row at once
    after = await db.fetchrow("SELECT access_count, created_at, accessed_at FROM keychain")
    assert after["access_count"] == 3
    assert after["accessed_at"] > after["created_at"]
    assert await keychain.flush_reads() == 0  # nothing is counted twice


async def test_hit_counts_of_every_process_reach_the_row_by_themselves_and_at_close(settings, keychain, execution_id):
    """Each process counts its hits in memory; they reach the row every KEYCHAIN_READ_FLUSH_SECONDS and when the
    process closes its Keychain, and the counts of several processes add up."""
    await keychain.put("counted", "v", execution_id=execution_id)
    often = await Keychain(settings.model_copy(update={"read_flush_seconds": 0.2})).open()
    seldom = await Keychain(settings.model_copy(update={"read_flush_seconds": 3600})).open()

    async def count() -> int:
        return await keychain.pool.fetchval("SELECT access_count FROM keychain WHERE credential_name = 'counted'")

    try:
        for _ in range(4):
            assert await often.get("counted", execution_id=execution_id)
        for _ in range(3):
            assert await seldom.get("counted", execution_id=execution_id)
        deadline = asyncio.get_running_loop().time() + 10
        while await count() != 4 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        assert await count() == 4  # `often` wrote its count by itself; `seldom` holds its own
    finally:
        await often.close()
        await seldom.close()
    assert await count() == 7


async def test_read_through_fetches_once_then_hits(keychain, sm, secret, execution_id, db):
    secret_id, value = secret
    first = await keychain.get_or_fetch(ref_of(secret_id), ref_of(secret_id), execution_id=execution_id)
    assert first.value == value
    second = await keychain.get_or_fetch(ref_of(secret_id), ref_of(secret_id), execution_id=execution_id)
    assert second.outcome == "hit" and second.value == value
    assert sm.access_count(secret_id) == 1
    sources = await db.fetchval("SELECT sources FROM keychain")
    assert '"version": "1"' in sources and "projects/1014428265962/secrets/" in sources  # resolved by number
    assert f"projects/{PROJECT}/secrets/{secret_id}" in sources


async def test_read_throughs_never_starve_a_small_pool(stack, settings, key_spec, keychain, sm, unique, execution_id):
    """Many read-throughs at once on a pool of two connections: each holds one connection for its fetch (the shared
    fetch runs in the read-through's own transaction), so they all finish."""
    secret_ids = [f"pool{i}-{unique}" for i in range(4)]
    for secret_id in secret_ids:
        sm.create_secret(secret_id)
        sm.add_version(secret_id, f"value-{secret_id}")
    sm.delay_seconds = 0.05
    small = make_settings(stack, settings.schema_name, key_spec, pool_min_size=0, pool_max_size=2)
    async with Keychain(small, source=SecretManagerSource(small)) as kc:
        reads = [kc.get_or_fetch(f"n{i}", ref_of(secret_ids[i % 4]), execution_id=execution_id) for i in range(12)]
        lookups = await asyncio.wait_for(asyncio.gather(*reads), 60)
    assert [lookup.value for lookup in lookups] == [f"value-{secret_ids[i % 4]}" for i in range(12)]
    assert [sm.access_count(s) for s in secret_ids] == [1, 1, 1, 1]  # shared between the read-throughs


async def test_the_secret_manager_budget_is_shared_by_every_process(stack, settings, key_spec, keychain, sm, unique,
                                                                    execution_id):
    """Two processes (two keychains, two pools) on a budget of 3 calls per minute: together they make 3 calls (a
    fetch that another process's fetch answered takes nothing); the fourth call waits for the budget."""
    secret_ids = [f"bud{i}-{unique}" for i in range(4)]
    for secret_id in secret_ids:
        sm.create_secret(secret_id)
        sm.add_version(secret_id, f"value-{secret_id}")
    budget = make_settings(stack, settings.schema_name, key_spec, secret_manager_max_calls_per_minute=3)

    async def tokens():
        return await keychain.pool.fetchval("SELECT tokens FROM keychain_call_budget")

    async with Keychain(budget, source=SecretManagerSource(budget)) as a, \
            Keychain(budget, source=SecretManagerSource(budget)) as b:
        assert (await a.get_or_fetch("n", ref_of(secret_ids[0]), execution_id=execution_id)).value == f"value-{secret_ids[0]}"
        await b.fetcher.fetch(SecretRef.parse(ref_of(secret_ids[1])))
        assert 0.9 < await tokens() < 1.5  # two calls taken (a token refills every 20 s)
        await b.fetcher.fetch(SecretRef.parse(ref_of(secret_ids[0])))  # answered by a's fetch: no call
        await a.get_or_fetch("m", ref_of(secret_ids[1]), execution_id=execution_id)  # the same
        assert 0.9 < await tokens() < 1.5
        await a.fetcher.fetch(SecretRef.parse(ref_of(secret_ids[2])))
        waiting = asyncio.create_task(b.fetcher.fetch(SecretRef.parse(ref_of(secret_ids[3]))))
        await asyncio.sleep(0.5)
        assert not waiting.done() and sm.access_count(secret_ids[3], code=None) == 0  # the budget is spent
        assert await tokens() < -0.5  # b waits its turn
        waiting.cancel()
    assert [sm.access_count(s, code=None) for s in secret_ids] == [1, 1, 1, 0]


async def test_concurrent_read_through_in_one_process_calls_once(keychain, sm, secret, execution_id):
    secret_id, value = secret
    sm.delay_seconds = 0.2
    results = await asyncio.gather(*[
        keychain.get_or_fetch("openai", ref_of(secret_id), execution_id=execution_id) for _ in range(50)
    ])
    assert {r.value for r in results} == {value}
    assert sm.access_count(secret_id) == 1


async def test_concurrent_read_through_across_keychains_calls_once(settings, keychain, sm, secret, execution_id):
    """Separate pools and single-flight maps, as separate processes have: the database lock decides."""
    secret_id, value = secret
    sm.delay_seconds = 0.3
    others = [await Keychain(settings, source=SecretManagerSource(settings)).open() for _ in range(4)]
    try:
        results = await asyncio.gather(*[
            kc.get_or_fetch("openai", ref_of(secret_id), execution_id=execution_id) for kc in others for _ in range(3)
        ])
    finally:
        for kc in others:
            await kc.close()
    assert {r.value for r in results} == {value}
    assert sm.access_count(secret_id) == 1


async def test_not_found_is_remembered_not_retried(keychain, sm, unique, execution_id):
    missing = ref_of(f"missing-{unique}")
    with pytest.raises(SecretNotFound):
        await keychain.get_or_fetch("m", missing, execution_id=execution_id)
    calls = sm.calls["AccessSecretVersion"]
    for other in range(20):
        with pytest.raises(CachedFailure, match="NOT_FOUND"):
            await keychain.get_or_fetch("m", missing, execution_id=execution_id + other)
    assert sm.calls["AccessSecretVersion"] == calls


async def test_unavailable_is_retried(keychain, sm, secret, execution_id):
    secret_id, value = secret
    sm.inject(grpc.StatusCode.UNAVAILABLE, times=3)
    lookup = await keychain.get_or_fetch("x", ref_of(secret_id), execution_id=execution_id)
    assert lookup.value == value


async def test_tampered_row_is_an_error_not_a_value(keychain, db, execution_id):
    await keychain.put("cred", "the-value", execution_id=execution_id)
    await db.execute("UPDATE keychain SET data = overlay(data placing '\\x00'::bytea from 20 for 1)")
    with pytest.raises(DecryptionError) as caught:
        await keychain.get("cred", execution_id=execution_id)
    assert "the-value" not in str(caught.value)


async def test_ciphertext_swapped_between_executions_is_rejected(keychain, db, execution_id):
    await keychain.put("cred", "value-of-a", execution_id=execution_id)
    await keychain.put("cred", "value-of-b", execution_id=execution_id + 1)
    await db.execute(
        """UPDATE keychain SET data = (SELECT data FROM keychain WHERE execution_id = $1)
           WHERE execution_id = $2""",
        execution_id, execution_id + 1,
    )
    with pytest.raises(DecryptionError):
        await keychain.get("cred", execution_id=execution_id + 1)
    assert (await keychain.get("cred", execution_id=execution_id)).value == "value-of-a"


async def test_an_earlier_ciphertext_of_the_same_row_written_back_fails(keychain, db, execution_id):
    await keychain.put("cred", "old-value", execution_id=execution_id)
    old = await db.fetchval("SELECT data FROM keychain WHERE execution_id = $1", execution_id)
    await keychain.put("cred", "new-value", execution_id=execution_id)
    await db.execute("UPDATE keychain SET data = $1 WHERE execution_id = $2", old, execution_id)  # a replay
    with pytest.raises(DecryptionError) as caught:
        await keychain.get("cred", execution_id=execution_id)
    assert "old-value" not in str(caught.value)


async def test_rows_sealed_before_the_write_binding_still_read_and_rekey_binds_them(keychain, key_spec, db,
                                                                                    execution_id):
    """Format 1 rows (no write id) as an older release wrote them: read as before, bound by the next rekey."""
    import base64

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    kid, raw = key_spec.split(":", 1)
    for i in range(3):
        await keychain.put(f"legacy-{i}", "placeholder", execution_id=execution_id)
        identity = Scope.of(execution_id=execution_id).identity(f"legacy-{i}")
        nonce = bytes(12)
        legacy = b"\x01" + nonce + AESGCM(base64.b64decode(raw)).encrypt(
            nonce, f'"legacy-value-{i}"'.encode(), identity.associated_data(kid))
        await db.execute("UPDATE keychain SET data = $1, write_id = NULL WHERE credential_name = $2",
                         legacy, f"legacy-{i}")
    assert (await keychain.get("legacy-0", execution_id=execution_id)).value == "legacy-value-0"
    assert await keychain.maintenance.rekey() == (3, 0)  # same key, but bound now
    assert await db.fetchval("SELECT count(*) FROM keychain WHERE write_id IS NULL") == 0
    assert (await keychain.get("legacy-1", execution_id=execution_id)).value == "legacy-value-1"
    # and a format 1 ciphertext is refused in a row that has a write id (no downgrade)
    await db.execute("UPDATE keychain SET data = $1 WHERE credential_name = 'legacy-2'", legacy)
    with pytest.raises(DecryptionError):
        await keychain.get("legacy-2", execution_id=execution_id)


async def test_wrong_key_is_a_clear_error(keychain, stack, settings, execution_id):
    await keychain.put("cred", "v", execution_id=execution_id)
    stranger = make_settings(stack, settings.schema_name, KeyRing.generate_spec("k1"))
    async with Keychain(stranger) as other:
        with pytest.raises(DecryptionError, match="failed authentication"):
            await other.get("cred", execution_id=execution_id)


async def test_key_rotation_and_rekey(keychain, stack, settings, key_spec, db, execution_id):
    for i in range(25):
        await keychain.put(f"cred-{i}", {"n": i}, execution_id=execution_id)
    new_key = KeyRing.generate_spec("k2")
    rotated = make_settings(stack, settings.schema_name, f"{new_key},{key_spec}")
    async with Keychain(rotated) as kc:
        assert (await kc.get("cred-3", execution_id=execution_id)).value == {"n": 3}  # old rows still read
        await kc.put("fresh", 1)  # new rows use the new key
        assert await db.fetchval("SELECT key_id FROM keychain WHERE credential_name = 'fresh'") == "k2"
        assert await kc.maintenance.rekey(batch_size=7) == (25, 0)
        assert await kc.maintenance.rekey() == (0, 0)
    assert await db.fetchval("SELECT count(*) FROM keychain WHERE key_id <> 'k2'") == 0
    only_new = make_settings(stack, settings.schema_name, new_key)
    async with Keychain(only_new) as kc:
        for i in range(25):
            assert (await kc.get(f"cred-{i}", execution_id=execution_id)).value == {"n": i}


async def test_rekey_under_concurrent_reads_fails_no_read(keychain, stack, settings, key_spec, execution_id):
    for i in range(200):
        await keychain.put(f"c{i}", i, execution_id=execution_id)
    rotated = make_settings(stack, settings.schema_name, f"{KeyRing.generate_spec('k2')},{key_spec}")
    async with Keychain(rotated) as reader, Keychain(rotated) as rekeyer:
        stop = asyncio.Event()
        reads = 0

        async def read_loop(offset):
            nonlocal reads
            i = offset
            while not stop.is_set():
                lookup = await reader.get(f"c{i % 200}", execution_id=execution_id)
                assert lookup.value == i % 200
                reads += 1
                i += 7

        readers = [asyncio.create_task(read_loop(k)) for k in range(4)]
        assert await rekeyer.maintenance.rekey(batch_size=10) == (200, 0)
        stop.set()
        await asyncio.gather(*readers)  # any failed read raises here
    assert reads > 0


async def test_no_plaintext_in_table_or_logs(keychain, sm, secret, db, execution_id, caplog):
    secret_id, value = secret
    caplog.set_level(logging.DEBUG)
    await keychain.get_or_fetch("openai", ref_of(secret_id), execution_id=execution_id)
    await keychain.put("other", {"password": value}, execution_id=execution_id)
    assert (await keychain.get("openai", execution_id=execution_id)).value == value
    dump = "\n".join(r[0] for r in await db.fetch("SELECT k::text FROM keychain k"))
    assert dump and value not in dump and value.encode().hex() not in dump  # as text, or as bytea hex
    assert caplog.records and all(value not in r.getMessage() for r in caplog.records)
    assert value not in repr(await keychain.get("openai", execution_id=execution_id))


async def test_finish_execution_deletes_only_that_execution(keychain, execution_id):
    await keychain.put("a", 1, execution_id=execution_id)
    await keychain.put("b", 2, execution_id=execution_id)
    await keychain.put("a", 3, execution_id=execution_id + 1)
    await keychain.put("a", 4)
    assert await keychain.maintenance.finish_execution(execution_id) == 2
    assert (await keychain.get("a", execution_id=execution_id)).outcome == "miss"
    assert (await keychain.get("a", execution_id=execution_id + 1)).value == 3
    assert (await keychain.get("a")).value == 4


async def test_sweep_deletes_exactly_the_expired_rows(keychain, db, execution_id):
    for i in range(30):
        await keychain.put(f"c{i}", i, execution_id=execution_id)
    await db.execute("UPDATE keychain SET expires_at = now() - interval '1 minute' WHERE credential_name ~ '^c[0-9]$'")
    assert await keychain.maintenance.sweep(batch_size=3) == 10
    names = {r[0] for r in await db.fetch("SELECT credential_name FROM keychain")}
    assert names == {f"c{i}" for i in range(10, 30)}
    assert await keychain.maintenance.sweep() == 0


async def test_invalidate_matches_project_id_and_number(keychain, sm, secret, execution_id):
    secret_id, _ = secret
    await keychain.get_or_fetch("by-id", ref_of(secret_id), execution_id=execution_id)
    await keychain.put("unrelated", "x", execution_id=execution_id)
    assert await keychain.maintenance.invalidate(Selection.of(secret=f"projects/1014428265962/secrets/{secret_id}")) == 1
    assert (await keychain.get("by-id", execution_id=execution_id)).outcome == "stale"
    assert await keychain.get("unrelated", execution_id=execution_id)
    await keychain.get_or_fetch("again", ref_of(secret_id), execution_id=execution_id)
    assert await keychain.maintenance.invalidate(Selection.of(secret=f"projects/{PROJECT}/secrets/{secret_id}")) == 1


async def test_invalidate_by_credential_execution_and_all(keychain, execution_id):
    await keychain.put("a", 1, execution_id=execution_id)
    await keychain.put("a", 1)
    await keychain.put("b", 1, execution_id=execution_id)
    await keychain.put("c", 1, execution_id=execution_id + 1)
    assert await keychain.maintenance.invalidate(Selection.of(credential="a")) == 2
    assert await keychain.maintenance.invalidate(Selection.of(execution_id=execution_id)) == 1
    assert await keychain.maintenance.invalidate(Selection.of(everything=True)) == 1
    assert not await keychain.get("c", execution_id=execution_id + 1)
    with pytest.raises(ValueError):
        await keychain.maintenance.invalidate(Selection.of(credential="a", everything=True))


async def test_put_many_with_provenance(keychain, db, execution_id):
    ref = SecretRef.parse(f"projects/{PROJECT}/secrets/s/versions/latest")
    entries = [
        Entry(f"n{i}", Scope.of(execution_id=execution_id + i), f"v{i}",
              sources=(Provenance(ref, "projects/1014428265962/secrets/s/versions/4"),))
        for i in range(100)
    ]
    await keychain.rows.put_many(entries)
    assert await db.fetchval("SELECT count(*) FROM keychain WHERE sources @> '[{\"version\": \"4\", \"pinned\": false}]'") == 100
    assert (await keychain.get("n42", execution_id=execution_id + 42)).value == "v42"


async def test_finish_fences_later_writes_and_read_through(keychain, sm, secret, execution_id):
    secret_id, value = secret
    await keychain.put("a", 1, execution_id=execution_id)
    await keychain.put("g", 1)
    assert await keychain.maintenance.finish_execution(execution_id) == 1
    assert await keychain.maintenance.finish_execution(execution_id) == 0  # idempotent
    await keychain.put("a", 2, execution_id=execution_id)  # a late warm, or a redelivered start event
    assert (await keychain.get("a", execution_id=execution_id)).outcome == "miss"
    late = await keychain.get_or_fetch("b", ref_of(secret_id), execution_id=execution_id)
    assert late.value == value  # the reader still gets its value ...
    assert (await keychain.get("b", execution_id=execution_id)).outcome == "miss"  # ... but nothing is stored
    assert await keychain.get("g")  # global rows are not the execution's


async def test_writes_racing_finish_leave_nothing(keychain, settings, execution_id, db):
    """Many writers against one finisher, repeated: after the finish commits, no row of the execution remains."""
    async with Keychain(settings) as other:
        for round_ in range(20):
            eid = execution_id + round_
            writes = [keychain.put(f"c{i}", i, execution_id=eid) for i in range(5)]
            await asyncio.gather(*writes[:2], other.maintenance.finish_execution(eid), *writes[2:])
            assert await db.fetchval("SELECT count(*) FROM keychain WHERE execution_id = $1", eid) == 0


async def test_failed_entries_surface_as_errors(keychain, execution_id):
    await keychain.rows.put_many([Entry("broken", Scope.of(execution_id=execution_id), error_code="NOT_FOUND")])
    with pytest.raises(CachedFailure, match="NOT_FOUND"):
        await keychain.get("broken", execution_id=execution_id)


async def test_existing_rows_and_failures(keychain, execution_id):
    await keychain.put("a", 1, execution_id=execution_id)
    await keychain.put("b", 1, execution_id=execution_id, ttl_seconds=5)
    wanted = [Scope.of(execution_id=execution_id).identity(n) for n in ("a", "b", "c")]
    assert await keychain.rows.existing(wanted) == {wanted[0]: (True, frozenset()), wanted[1]: (True, frozenset())}
    assert await keychain.rows.existing(wanted, min_remaining_seconds=60) == {
        wanted[0]: (True, frozenset()), wanted[1]: (False, frozenset())}
    await keychain.fetcher.record_failure("projects/p/secrets/x/versions/1", "NOT_FOUND")
    assert await keychain.fetcher.fetch(SecretRef.parse("projects/p/secrets/x/versions/1")) == "NOT_FOUND"


async def test_the_first_read_of_each_written_value_measures_the_warm_lead(keychain, execution_id):
    """Only the first read after a write observes the lead time; a rewrite starts over; the bookkeeping counts all."""
    from keychain import metrics

    def firsts():
        samples = metrics.WARM_LEAD_SECONDS.collect()[0].samples
        return next(s.value for s in samples if s.name.endswith("_count"))

    before = firsts()
    await keychain.put("lead", "v1", execution_id=execution_id)
    for _ in range(3):
        assert (await keychain.get("lead", execution_id=execution_id)).value == "v1"
    assert firsts() == before + 1
    await keychain.put("lead", "v2", execution_id=execution_id)
    assert (await keychain.get("lead", execution_id=execution_id)).value == "v2"
    assert (await keychain.get("lead", execution_id=execution_id)).value == "v2"
    assert firsts() == before + 2
    await keychain.flush_reads()
    row = await keychain.pool.fetchrow("SELECT access_count, reads_since_write, accessed_at > updated_at AS read "
                                       "FROM keychain WHERE credential_name = 'lead'")
    assert (row["access_count"], row["reads_since_write"], row["read"]) == (5, 2, True)


async def test_reads_of_an_earlier_write_count_as_hits_not_as_reads_of_the_new_value(keychain, execution_id):
    await keychain.put("rewritten", "v1", execution_id=execution_id)
    for _ in range(2):
        assert (await keychain.get("rewritten", execution_id=execution_id)).value == "v1"
    await keychain.put("rewritten", "v2", execution_id=execution_id)  # written again before the counts are
    assert await keychain.flush_reads() == 1
    row = await keychain.pool.fetchrow("SELECT access_count, reads_since_write FROM keychain")
    assert (row["access_count"], row["reads_since_write"]) == (2, 0)


async def test_a_fetch_waits_for_the_process_holding_its_reference_and_no_longer(stack, settings, key_spec, keychain,
                                                                                 sm, secret):
    """Another process holds the reference's lock (it is fetching): a fetch waits for it, gives up with
    SecretUnavailable after KEYCHAIN_FETCH_LOCK_TIMEOUT_SECONDS, and fetches at once when that process is gone
    (its connection, and so its lock, goes with it)."""
    secret_id, value = secret
    ref = SecretRef.parse(ref_of(secret_id))
    holder = await asyncpg.connect(settings.dsn)
    assert await holder.fetchval(keychain._db.q["try_lock_fetch"], str(ref))
    impatient = make_settings(stack, settings.schema_name, key_spec, fetch_lock_timeout_seconds=0.5)
    async with Keychain(impatient, source=SecretManagerSource(impatient)) as other:
        with pytest.raises(SecretUnavailable):
            await other.fetcher.fetch(ref)
        assert sm.access_count(secret_id) == 0
        waiting = asyncio.create_task(keychain.fetcher.fetch(ref))
        await asyncio.sleep(0.3)
        assert not waiting.done()
        await holder.close()  # the fetching process dies
        fetched = (await asyncio.wait_for(waiting, 10)).value
    assert fetched.payload.decode() == value and sm.access_count(secret_id) == 1


async def test_rows_written_are_counted_once_committed(keychain, db, execution_id):
    """keychain_rows_written_total counts what committed: a transaction PostgreSQL rolled back and the library ran
    again counts once; a fenced row, or a row of an execution that finished, counts nothing."""
    from keychain import metrics

    written = metrics.ROWS_WRITTEN.labels("keychain")
    await db.execute("""
        CREATE SEQUENCE first_insert;
        CREATE FUNCTION roll_back_once() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF nextval('first_insert') = 1 THEN RAISE EXCEPTION 'concurrent update' USING ERRCODE = '40001'; END IF;
            RETURN NEW;
        END $$;
        CREATE CONSTRAINT TRIGGER roll_back_once AFTER INSERT ON keychain DEFERRABLE INITIALLY DEFERRED
            FOR EACH ROW EXECUTE FUNCTION roll_back_once();""")
    before = written._value.get()
    # the first attempt wrote its row, then was rolled back at its commit; the second commits
    await keychain.put("retried", "v", execution_id=execution_id)
    assert await db.fetchval("SELECT nextval('first_insert')") == 3  # two attempts were made
    assert written._value.get() == before + 1
    fenced = Entry("fenced", Scope.of(execution_id=execution_id), "v", fences=(("projects/1/secrets/f", 41),))
    assert await keychain.rows.put_many([fenced]) == [fenced]
    await keychain.maintenance.finish_execution(execution_id + 1)
    await keychain.put("late", "v", execution_id=execution_id + 1)  # its execution finished: fenced out
    assert written._value.get() == before + 1
    assert await db.fetchval("SELECT count(*) FROM keychain") == 1


async def test_a_caller_that_joins_a_fetch_keeps_its_own_deadline(keychain, sm, secret):
    """Two callers of one reference, the first with a deadline too short for Secret Manager's UNAVAILABLE spell: the
    first gives up at its deadline, the second (joined to the same fetch) fetches again with the time it has left."""
    import time

    secret_id, value = secret
    ref = SecretRef.parse(ref_of(secret_id))
    sm.inject(grpc.StatusCode.UNAVAILABLE, times=40, secret=secret_id)
    short = asyncio.ensure_future(keychain.fetcher.fetch(ref, deadline=time.monotonic() + 0.05))
    await asyncio.sleep(0)  # its fetch is in flight
    patient = asyncio.ensure_future(keychain.fetcher.fetch(ref, deadline=time.monotonic() + 20))
    with pytest.raises(SecretUnavailable):
        await short
    assert (await patient).value.text == value


async def test_a_spent_call_budget_is_waited_for_within_the_deadline_and_without_the_lock(stack, settings, key_spec,
                                                                                          keychain, sm, unique):
    """The shared budget spent for a minute, a fetch with two seconds left: it says so at once (never sleeps past its
    deadline) and holds no lock meanwhile, so another process is free to fetch the reference."""
    import time

    ids = [f"bq{i}-{unique}" for i in range(2)]
    for secret_id in ids:
        sm.create_secret(secret_id)
        sm.add_version(secret_id, f"value-{secret_id}")
    budget = make_settings(stack, settings.schema_name, key_spec, secret_manager_max_calls_per_minute=1)
    async with Keychain(budget, source=SecretManagerSource(budget)) as a:
        await a.fetcher.fetch(SecretRef.parse(ref_of(ids[0])))  # the one call of this minute
        with pytest.raises(SecretUnavailable, match="budget"):
            await asyncio.wait_for(a.fetcher.fetch(SecretRef.parse(ref_of(ids[1])),
                                                   deadline=time.monotonic() + 2), 10)
        other = await asyncpg.connect(settings.dsn)
        try:
            assert await other.fetchval(keychain._db.q["try_lock_fetch"], str(SecretRef.parse(ref_of(ids[1]))))
        finally:
            await other.close()
    assert sm.access_count(ids[1], code=None) == 0

"""The warmer against real PostgreSQL and the Secret Manager test server, without the broker."""

import asyncio

import grpc
import pytest

from keychain.invalidation import Selection
from keychain import Keychain, SecretManagerSource
from keychain.model import Scope
from keychain.refs import SecretRef
from streams.resolve import Want
from streams.warm import Warmer

from .conftest import make_settings


@pytest.fixture
def warmer(stack, settings, keychain, key_spec):
    tuned = make_settings(stack, settings.schema_name, key_spec, warm_deadline_seconds=5.0)
    return Warmer(tuned, keychain)


def want(name, secret_id, execution_id=None, field=None):
    scope = Scope.of(execution_id=execution_id)
    return Want(name, scope, ((field, SecretRef.parse(f"projects/test-project/secrets/{secret_id}")),))


async def test_unavailable_secret_does_not_hold_back_others(warmer, keychain, sm, unique, execution_id):
    for name in ("slow", "fine"):
        sm.create_secret(f"{name}-{unique}")
        sm.add_version(f"{name}-{unique}", name)
    sm.inject(grpc.StatusCode.UNAVAILABLE, times=40, secret=f"slow-{unique}")  # beyond the source's own retries
    refused, written = await warmer.warm([want("a", f"slow-{unique}", execution_id), want("b", f"fine-{unique}", execution_id)])
    assert refused == {} and written == 2
    rows = {r["credential_name"]: r["updated_at"] for r in await keychain.pool.fetch("SELECT credential_name, updated_at FROM keychain")}
    assert rows["b"] < rows["a"]  # the healthy secret's row was written first, in an earlier round
    assert (await keychain.get("a", execution_id=execution_id)).value == "slow"


async def test_unavailable_past_the_deadline_is_refused_not_written(warmer, keychain, sm, secret, execution_id):
    secret_id, _ = secret
    sm.inject(grpc.StatusCode.UNAVAILABLE, secret=secret_id)
    warmer.settings = warmer.settings.model_copy(update={"warm_deadline_seconds": 0.3})
    wanted = want("x", secret_id, execution_id)
    refused, written = await warmer.warm([wanted])
    assert refused == {wanted: "UNAVAILABLE"} and written == 0
    assert (await keychain.get("x", execution_id=execution_id)).outcome == "miss"


async def test_keep_warm_refreshes_read_global_rows_near_expiry(warmer, keychain, sm, secret, unique):
    secret_id, value = secret
    sm.create_secret(f"other-{unique}")
    sm.add_version(f"other-{unique}", "other-value")
    mapped = Want("amadeus", Scope.of(), (
        ("client_id", SecretRef.parse(f"projects/test-project/secrets/{secret_id}")),
        ("client_secret", SecretRef.parse(f"projects/test-project/secrets/other-{unique}")),
    ))
    await warmer.warm([mapped, want("unread", secret_id)])
    assert (await keychain.get("amadeus")).value == {"client_id": value, "client_secret": "other-value"}
    await keychain.pool.execute("UPDATE keychain SET expires_at = now() + interval '1 second'")
    sm.add_version(secret_id, "rotated")
    keychain.fetcher.forget()
    assert await warmer.refresh_globals() == 1  # only the row that was read since it was written
    assert (await keychain.get("amadeus")).value == {"client_id": "rotated", "client_secret": "other-value"}
    assert await keychain.pool.fetchval(
        "SELECT expires_at > now() + interval '1 minute' FROM keychain WHERE credential_name = 'amadeus'")


async def test_an_unexpected_error_dead_letters_its_own_event_only(warmer, keychain, db, sm, secret, execution_id):
    """A real database error for one event's row (a trigger refuses it) must not take the batch's other events."""
    import json

    from streams.batches import Record

    secret_id, value = secret
    await db.execute("""
        CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN IF NEW.credential_name = 'poison' THEN RAISE EXCEPTION 'refused'; END IF; RETURN NEW; END $$;
        CREATE TRIGGER refuse_poison BEFORE INSERT OR UPDATE ON keychain FOR EACH ROW EXECUTE FUNCTION refuse_poison();
    """)
    ref = f"projects/test-project/secrets/{secret_id}"

    def start(execution_id, name):
        doc = {"event_type": "execution.started", "execution_id": execution_id,
               "credentials": [{"ref": ref, "name": name}]}
        return Record(str(execution_id).encode(), json.dumps(doc).encode(), "events", 0, execution_id % 1000)

    result = await warmer.handle([start(execution_id, "fine"), start(execution_id + 1, "poison"),
                                  start(execution_id + 2, "also-fine")])
    assert [(d.record.key, d.reason) for d in result.dead] == [(str(execution_id + 1).encode(), "internal_error")]
    assert (await keychain.get("fine", execution_id=execution_id)).value == value
    assert (await keychain.get("also-fine", execution_id=execution_id + 2)).value == value
    assert sm.access_count(secret_id) == 1


async def test_a_global_name_repointed_is_never_served_for_the_old_reference(warmer, keychain, sm, unique):
    """Execution A names global `shared` = secret X, execution B names `shared` = secret Y: a read that names X must
    get X's value (reading through), never Y's; the repoint is logged and counted."""
    from streams import metrics

    x, y = f"x-{unique}", f"y-{unique}"
    for secret_id in (x, y):
        sm.create_secret(secret_id)
        sm.add_version(secret_id, f"value-of-{secret_id}")
    ref_x = f"projects/test-project/secrets/{x}/versions/latest"
    await warmer.warm([want("shared", x)])
    await keychain.maintenance.invalidate(Selection.of(secret=f"projects/test-project/secrets/{x}"))
    repoints = metrics.GLOBAL_REPOINTS._value.get()
    await warmer.warm([want("shared", y)])
    assert metrics.GLOBAL_REPOINTS._value.get() == repoints + 1
    assert (await keychain.get("shared")).value == f"value-of-{y}"  # a read that names no reference
    calls = sm.access_count(x)
    lookup = await keychain.get_or_fetch("shared", ref_x)
    assert lookup.value == f"value-of-{x}" and sm.access_count(x) == calls + 1  # read through, not Y's value
    assert (await keychain.get_or_fetch("shared", ref_x)).value == f"value-of-{x}"  # now a hit
    assert sm.access_count(x) == calls + 1
    # without an invalidation in between, a warm naming the other secret still writes over (and is counted)
    await warmer.warm([want("shared", y)])
    assert metrics.GLOBAL_REPOINTS._value.get() == repoints + 2
    assert (await keychain.get_or_fetch("shared", ref_x)).value == f"value-of-{x}"


async def test_a_read_through_takes_what_the_warmer_fetched_a_moment_ago(warmer, keychain, sm, secret, execution_id):
    """Another execution's read-through of a secret the warmer (in any process) just fetched calls no one."""
    secret_id, value = secret
    ref = f"projects/test-project/secrets/{secret_id}/versions/latest"
    await warmer.warm([want(ref, secret_id, execution_id)])
    calls = sm.access_count(secret_id)
    lookup = await keychain.get_or_fetch(ref, ref, execution_id=execution_id + 1)
    assert lookup.value == value and sm.access_count(secret_id) == calls
    # an invalidation of the secret is never undone by a shared value: the next read-through calls again
    sm.add_version(secret_id, "rotated")
    await keychain.maintenance.invalidate(Selection.of(secret=f"projects/test-project/secrets/{secret_id}"))
    assert (await keychain.get_or_fetch(ref, ref, execution_id=execution_id + 2)).value == "rotated"
    assert sm.access_count(secret_id) == calls + 1


async def test_reads_racing_a_warm_join_its_fetch(stack, settings, key_spec, warmer, keychain, sm, unique, execution_id):
    """First reads (from another process: a keychain with its own pool) that come before, during and after the
    warm's Secret Manager call, for the row being warmed and for another execution's row: each secret is fetched
    once, by whichever came first, and every read gets the value."""
    secret_ids = [f"join{i}-{unique}" for i in range(3)]
    for secret_id in secret_ids:
        sm.create_secret(secret_id)
        sm.add_version(secret_id, f"value-{secret_id}")
    sm.delay_seconds = 0.3
    refs = [f"projects/test-project/secrets/{s}/versions/latest" for s in secret_ids]
    reader_settings = make_settings(stack, settings.schema_name, key_spec)
    async with Keychain(reader_settings, source=SecretManagerSource(reader_settings)) as reader:

        async def read(delay: float, ref: str, execution: int):
            await asyncio.sleep(delay)
            return await reader.get_or_fetch(f"first-{delay}-{refs.index(ref)}", ref, execution_id=execution)

        async def warm_after(delay: float):
            await asyncio.sleep(delay)
            return await warmer.warm([want(f"w{i}", s, execution_id) for i, s in enumerate(secret_ids)])

        reads = [read(delay, ref, execution)
                 for delay in (0.0, 0.05, 0.15, 0.25, 0.5) for ref in refs for execution in (execution_id,
                                                                                              execution_id + 1)]
        # the warm starts 0.1 s in: the first reads come before it, the others while its calls are in flight
        outcome, *lookups = await asyncio.gather(warm_after(0.1), *reads)
    assert outcome == ({}, 3)
    assert [lookup.value for lookup in lookups] == [
        f"value-{s}" for _ in (0.0, 0.05, 0.15, 0.25, 0.5) for s in secret_ids for _ in range(2)]
    assert [sm.access_count(s) for s in secret_ids] == [1, 1, 1]  # no read made a call of its own


async def test_each_step_of_a_warm_is_timed(warmer, sm, secret, execution_id):
    from streams import metrics

    def counts():
        samples = metrics.WARM_STEP_SECONDS.collect()[0].samples
        return {s.labels["step"]: s.value for s in samples if s.name.endswith("_count")}

    secret_id, _ = secret
    before = counts()
    await warmer.warm([want("timed", secret_id, execution_id)])
    after = counts()
    assert {step: after[step] - before[step] for step in after} == {"plan": 0, "check": 1, "fetch": 1, "write": 1}

"""Invalidation semantics against real PostgreSQL and the Secret Manager test server (no broker needed)."""

import asyncio
import json
import random
from datetime import datetime, timezone

import pytest

from keychain.invalidation import Selection
from keychain import CachedFailure, Keychain, SecretManagerSource
from keychain.model import Scope
from keychain.refs import SecretIdentity, SecretRef
from streams.events import BadEvent
from streams.invalidate import Invalidator
from streams.notices import notice_from_kafka, notice_from_pubsub
from streams.resolve import Want
from streams.warm import Warmer

from .conftest import make_settings

NUMBER = "1014428265962"


@pytest.fixture
def parts(stack, settings, keychain, key_spec):
    tuned = make_settings(stack, settings.schema_name, key_spec, warm_deadline_seconds=5.0)
    source = SecretManagerSource(tuned)
    warmer = Warmer(tuned, keychain)
    return warmer, Invalidator(tuned, keychain, warmer, source)


def notice(event_type, secret_id, version=None, *, message_id=None, project=NUMBER):
    attributes = {"eventType": event_type, "secretId": f"projects/{project}/secrets/{secret_id}",
                  "dataFormat": "JSON_API_V1", "timestamp": datetime.now(timezone.utc).isoformat()}
    if version:
        attributes["versionId"] = f"projects/{project}/secrets/{secret_id}/versions/{version}"
    return notice_from_pubsub(message_id or f"m-{random.getrandbits(64)}", attributes, b"{}", None)


def want(name, secret_id, version="latest", execution_id=None):
    return Want(name, Scope.of(execution_id=execution_id),
                ((None, SecretRef.parse(f"projects/test-project/secrets/{secret_id}/versions/{version}")),))


async def value(keychain, name, execution_id=None):
    lookup = await keychain.get(name, execution_id=execution_id)
    return lookup.value if lookup else lookup.outcome


async def test_version_add_refreshes_latest_rows_and_keeps_pinned(parts, keychain, sm, secret, execution_id):
    warmer, invalidator = parts
    secret_id, v1 = secret
    await warmer.warm([want("latest", secret_id, execution_id=execution_id),
                       want("pinned", secret_id, "1", execution_id=execution_id), want("shared", secret_id)])
    sm.add_version(secret_id, "v2-value")
    applied = await invalidator.apply(notice("SECRET_VERSION_ADD", secret_id, "2"))
    assert applied.changed == 2 and applied.refreshed == 2
    assert await value(keychain, "latest", execution_id) == "v2-value"
    assert await value(keychain, "shared") == "v2-value"
    assert await value(keychain, "pinned", execution_id) == v1


async def test_disable_and_destroy_stop_serving_that_version(parts, keychain, sm, secret, execution_id):
    warmer, invalidator = parts
    secret_id, _ = secret
    sm.add_version(secret_id, "v2-value")
    await warmer.warm([want("latest", secret_id, execution_id=execution_id),
                       want("pinned1", secret_id, "1", execution_id=execution_id),
                       want("pinned2", secret_id, "2", execution_id=execution_id)])
    sm.set_state(f"projects/test-project/secrets/{secret_id}/versions/2", "DISABLED")
    await invalidator.apply(notice("SECRET_VERSION_DISABLE", secret_id, "2"))
    for name in ("latest", "pinned2"):  # latest resolved to 2, now disabled: no value at all
        with pytest.raises(CachedFailure, match="FAILED_PRECONDITION"):
            await keychain.get(name, execution_id=execution_id)
    assert await value(keychain, "pinned1", execution_id) != "v2-value"  # version 1 is untouched
    sm.set_state(f"projects/test-project/secrets/{secret_id}/versions/1", "DESTROYED")
    await invalidator.apply(notice("SECRET_VERSION_DESTROY", secret_id, "1"))
    with pytest.raises(CachedFailure):
        await keychain.get("pinned1", execution_id=execution_id)


async def test_delete_removes_every_row_of_the_secret(parts, keychain, sm, secret, execution_id):
    warmer, invalidator = parts
    secret_id, _ = secret
    await warmer.warm([want("a", secret_id, execution_id=execution_id), want("b", secret_id, "1"), want("c", secret_id)])
    sm._secrets.pop((sm.project_number, secret_id))  # deleted on the server side
    applied = await invalidator.apply(notice("SECRET_DELETE", secret_id))
    assert applied.changed == 3
    for name, eid in (("a", execution_id), ("b", None), ("c", None)):
        with pytest.raises(CachedFailure, match="NOT_FOUND"):
            await keychain.get(name, execution_id=eid)


async def test_no_value_change_events_drop_nothing(parts, keychain, secret):
    warmer, invalidator = parts
    secret_id, v1 = secret
    await warmer.warm([want("x", secret_id)])
    for event_type in ("SECRET_ROTATE", "SECRET_CREATE"):
        assert (await invalidator.apply(notice(event_type, secret_id))).changed == 0
    assert (await invalidator.apply(notice("SECRET_VERSION_ENABLE", secret_id, "1"))).changed == 0
    assert await value(keychain, "x") == v1


async def test_duplicates_apply_once_and_order_does_not_matter(parts, keychain, sm, secret, execution_id):
    warmer, invalidator = parts
    secret_id, _ = secret
    await warmer.warm([want("latest", secret_id, execution_id=execution_id),
                       want("pinned1", secret_id, "1", execution_id=execution_id)])
    sm.add_version(secret_id, "v2-value")
    sm.set_state(f"projects/test-project/secrets/{secret_id}/versions/1", "DISABLED")
    add = notice("SECRET_VERSION_ADD", secret_id, "2", message_id="add-1")
    disable = notice("SECRET_VERSION_DISABLE", secret_id, "1", message_id="disable-1")
    # delivered out of order, each twice
    results = [await invalidator.apply(n) for n in (disable, add, disable, add)]
    assert [r.changed is None for r in results] == [False, False, True, True]
    identity = SecretIdentity(NUMBER, secret_id)
    assert (await keychain.maintenance.generations([identity]))[identity] == 2
    assert await value(keychain, "latest", execution_id) == "v2-value"
    with pytest.raises(CachedFailure):
        await keychain.get("pinned1", execution_id=execution_id)


async def test_notice_naming_project_by_id_matches_rows_named_by_number(parts, keychain, sm, secret):
    warmer, invalidator = parts
    secret_id, _ = secret
    number_ref = Want("n", Scope.of(), ((None, SecretRef.parse(f"projects/{NUMBER}/secrets/{secret_id}")),))
    await warmer.warm([number_ref, want("i", secret_id)])
    sm.add_version(secret_id, "v2-value")
    assert (await invalidator.apply(notice("SECRET_VERSION_ADD", secret_id, "2", project="test-project"))).changed == 2
    assert await value(keychain, "n") == await value(keychain, "i") == "v2-value"


async def test_drop_mode_deletes_instead_of_refreshing(stack, settings, keychain, key_spec, sm, secret, execution_id):
    secret_id, _ = secret
    dropping = make_settings(stack, settings.schema_name, key_spec, rewarm_mode="drop")
    source = SecretManagerSource(dropping)
    warmer = Warmer(dropping, keychain)
    await warmer.warm([want("x", secret_id, execution_id=execution_id)])
    sm.add_version(secret_id, "v2-value")
    applied = await Invalidator(dropping, keychain, warmer, source).apply(notice("SECRET_VERSION_ADD", secret_id, "2"))
    assert applied.changed == 1 and applied.refreshed == 0
    assert await value(keychain, "x", execution_id) == "miss"


async def test_no_stale_write_when_a_fetch_races_an_invalidation(parts, keychain, settings, sm, unique, execution_id):
    """A warm or a read-through that fetched the old version before the invalidation was applied must not write it
    afterwards, and no read after the invalidation was applied may return the old version."""
    warmer, invalidator = parts
    async with Keychain(settings, source=SecretManagerSource(settings)) as reader:
        for round_ in range(25):
            secret_id = f"race{round_}-{unique}"
            sm.create_secret(secret_id)
            sm.add_version(secret_id, "old")
            sm.delay_seconds = random.uniform(0.0, 0.03)
            eid = execution_id + round_
            ref = f"projects/test-project/secrets/{secret_id}/versions/latest"
            applied_at = asyncio.Event()

            async def rotate():
                await asyncio.sleep(random.uniform(0.0, 0.03))
                sm.add_version(secret_id, "new")
                await invalidator.apply(notice("SECRET_VERSION_ADD", secret_id, "2"))
                applied_at.set()

            async def read_after_rotation():
                await applied_at.wait()
                for _ in range(5):
                    lookup = await reader.get_or_fetch("r", ref, execution_id=eid)
                    assert lookup.value == "new"

            await asyncio.gather(
                warmer.warm([want("w", secret_id, execution_id=eid)], skip_ready=False),
                reader.get_or_fetch("r", ref, execution_id=eid),
                rotate(),
                read_after_rotation(),
            )
            for name in ("w", "r"):
                lookup = await keychain.get(name, execution_id=eid)
                assert lookup.outcome in ("hit", "stale", "miss")
                assert lookup.value in (None, "new"), f"round {round_}: {name} holds the old version"


async def test_reconciliation_catches_a_lost_notice(parts, keychain, sm, secret, execution_id):
    warmer, invalidator = parts
    secret_id, v1 = secret
    await warmer.warm([want("latest", secret_id, execution_id=execution_id), want("pinned", secret_id, "1")])
    assert await invalidator.reconcile() == 0
    sm.add_version(secret_id, "v2-value")  # its notification never arrives
    assert await invalidator.reconcile() == 1
    assert await value(keychain, "latest", execution_id) == "v2-value"
    assert await value(keychain, "pinned") == v1
    assert await invalidator.reconcile() == 0


async def held(keychain, secret_id):
    rows = await keychain.pool.fetch(
        "SELECT version FROM keychain_latest_held WHERE secret = $1 AND held_until > now() ORDER BY 1",
        f"projects/{NUMBER}/secrets/{secret_id}")
    return [row["version"] for row in rows]


async def test_reconciliation_reads_a_summary_kept_with_the_rows(parts, keychain, sm, secret, execution_id):
    """The secrets held through `latest` are summarised by the write itself; invalidation and the sweep keep the
    summary honest, and a round never reads the keychain table (its cost does not grow with the table)."""
    warmer, invalidator = parts
    secret_id, _ = secret
    key = f"projects/{NUMBER}/secrets/{secret_id}"
    await warmer.warm([want("latest", secret_id, execution_id=execution_id), want("pinned", secret_id, "1")])
    assert await held(keychain, secret_id) == ["1"]  # the pinned row is not summarised: it cannot fall behind
    plan = "\n".join(r[0] for r in await keychain.pool.fetch(
        "EXPLAIN " + keychain._db.q["latest_secrets_to_check"].replace("$1", "50")))
    assert " on keychain " not in plan and "keychain_latest_held" in plan, plan

    sm.add_version(secret_id, "v2-value")
    await invalidator.apply(notice("SECRET_VERSION_ADD", secret_id, "2"))  # stale, then refreshed at version 2
    assert await held(keychain, secret_id) == ["2"]
    assert await value(keychain, "latest", execution_id) == "v2-value"

    # A summary row whose keychain rows moved on (here: written back by hand) is dropped by the next round, which
    # invalidates nothing and counts nothing behind.
    await keychain.pool.execute(
        "INSERT INTO keychain_latest_held (secret, version, held_until, ref) "
        "SELECT secret, '1', held_until, ref FROM keychain_latest_held WHERE secret = $1", key)
    assert await held(keychain, secret_id) == ["1", "2"]
    await keychain.pool.execute("UPDATE keychain_secret_state SET checked_at = NULL WHERE secret = $1", key)
    assert await invalidator.reconcile() == 0
    assert await held(keychain, secret_id) == ["2"]
    assert await value(keychain, "latest", execution_id) == "v2-value"

    # Once every row of its bucket has expired, the sweep removes a summary row.
    await keychain.pool.execute(
        "UPDATE keychain_latest_held SET held_until = now() - interval '1 second' WHERE secret = $1", key)
    await keychain.maintenance.sweep()
    assert await keychain.pool.fetchval("SELECT count(*) FROM keychain_latest_held WHERE secret = $1", key) == 0


@pytest.mark.parametrize(
    "attributes, reason",
    [
        ({"eventType": "secret exploded", "secretId": "projects/1/secrets/s"}, "invalid_notice"),
        ({"eventType": "SECRET_EXPLODED", "secretId": "projects/1/secrets/s/versions/2"}, "invalid_notice"),
        ({"eventType": "SECRET_VERSION_ADD", "secretId": "projects/1/locations/europe-west1/secrets/s",
          "versionId": "projects/1/secrets/s/versions/2"}, "invalid_notice"),  # the global secret's version
        ({"eventType": "SECRET_DELETE"}, "invalid_notice"),
        ({"eventType": "SECRET_DELETE", "secretId": "projects/1/secrets/s/versions/2"}, "invalid_notice"),
        ({"eventType": "SECRET_VERSION_ADD", "secretId": "projects/1/secrets/s"}, "invalid_notice"),
        ({"eventType": "SECRET_VERSION_ADD", "secretId": "projects/1/secrets/s",
          "versionId": "projects/1/secrets/other/versions/2"}, "invalid_notice"),
    ],
)
def test_malformed_notifications(attributes, reason):
    with pytest.raises(BadEvent) as caught:
        notice_from_pubsub("m", attributes, b"", None)
    assert caught.value.reason == reason


def test_notices_on_kafka_with_invented_event_types_are_refused_before_any_label():
    """Whatever reaches the rotations topic directly: its event type would be a metric label and a /stats key."""
    for invented in ("SECRET_EXPLODED", "x" * 200, ""):
        value = json.dumps({"notice_id": "n", "event_type": invented, "secret": "projects/1/secrets/s",
                            "occurred_at": "2026-11-26T00:00:00Z"}).encode()
        with pytest.raises(BadEvent) as caught:
            notice_from_kafka(value)
        assert caught.value.reason == "invalid_notice"
    known = notice_from_kafka(json.dumps({"notice_id": "n", "event_type": "SECRET_DELETE",
                                          "secret": "projects/1/secrets/s", "occurred_at": "2026-11-26T00:00:00Z"}))
    assert known.event_type == "SECRET_DELETE"


def test_liberal_notifications():
    assert notice_from_pubsub("m", {"eventType": "TOPIC_CONFIGURED"}, b"", None) is None
    recovered = notice_from_pubsub(
        "m", {"eventType": "SECRET_VERSION_DISABLE", "secretId": "projects/1/secrets/s"},
        json.dumps({"name": "projects/1/secrets/s/versions/7", "state": "DISABLED"}).encode(), None)
    assert recovered.version_number == "7" and recovered.match() == {"version": "7"}
    assert recovered.to_kafka()[0] == b"projects/1/secrets/s"


async def test_one_invalidation_three_doors_one_meaning(parts, keychain, sm, secret, execution_id):
    """The library's invalidate_secret (the CLI's door) and the worker's (POST /invalidate) reach the same rows:
    a whole secret, or one version; the worker refreshes at once, and rows the CLI left stale on its next round."""
    warmer, invalidator = parts
    secret_id, first = secret
    sm.add_version(secret_id, "second")
    pinned = Want("pinned", Scope.of(execution_id=execution_id),
                  ((None, SecretRef.parse(f"projects/test-project/secrets/{secret_id}/versions/1")),))
    floating = Want("floating", Scope.of(execution_id=execution_id),
                    ((None, SecretRef.parse(f"projects/test-project/secrets/{secret_id}")),))
    await warmer.warm([pinned, floating])
    # the library (CLI): one version, by its number, through the other project spelling
    assert await keychain.maintenance.invalidate(Selection.of(secret=f"projects/{NUMBER}/secrets/{secret_id}/versions/1")) == 1
    assert await value(keychain, "pinned", execution_id) == "stale"
    assert await value(keychain, "floating", execution_id) == "second"
    assert await invalidator.refresh_stale() == 1  # the worker's maintenance round
    assert await value(keychain, "pinned", execution_id) == first
    # the worker (POST /invalidate): the whole secret, refreshed at once
    applied = await invalidator.invalidate(Selection.of(secret=f"projects/test-project/secrets/{secret_id}"), cause="operator")
    assert applied.changed == 2 and applied.refreshed == 2
    assert await keychain.maintenance.stale_secrets() == []


async def test_notices_stop_serving_at_once_while_their_refreshes_wait_for_secret_manager(parts, keychain, sm, unique,
                                                                                          execution_id):
    """20 rotations while Secret Manager does not answer: every notice stops serving its rows at once; the refreshes
    run beside the stream, a bounded few at a time, and write the new values once Secret Manager answers."""
    from streams.batches import Record
    from streams.invalidate import REFRESHES_IN_FLIGHT

    warmer, invalidator = parts
    ids = [f"slow{i}-{unique}" for i in range(20)]
    for secret_id in ids:
        sm.create_secret(secret_id)
        sm.add_version(secret_id, "v1")
    await warmer.warm([want(f"w{i}", secret_id, execution_id=execution_id) for i, secret_id in enumerate(ids)])
    for secret_id in ids:
        sm.add_version(secret_id, "v2")
        sm.hold(secret_id)  # every fetch of it waits until released
    records = [Record(None, notice("SECRET_VERSION_ADD", secret_id, "2").model_dump_json().encode(), "rotations", 0, i)
               for i, secret_id in enumerate(ids)]
    try:
        result = await asyncio.wait_for(invalidator.handle(records), 30)  # no notice waits for a refresh
        assert (result.applied, result.dead) == (20, [])
        for i in range(20):
            assert await value(keychain, f"w{i}", execution_id) == "stale"
        for _ in range(100):
            if sum(sm.holding.values()) == REFRESHES_IN_FLIGHT:
                break
            await asyncio.sleep(0.02)
        assert sum(sm.holding.values()) == REFRESHES_IN_FLIGHT  # bounded
    finally:
        for secret_id in ids:
            sm.release(secret_id)
    await invalidator.settled()
    assert [await value(keychain, f"w{i}", execution_id) for i in range(20)] == ["v2"] * 20

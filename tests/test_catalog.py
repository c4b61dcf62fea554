"""NoETL's catalog table, read by catalog id or path, cached, waited for, and refused when it cannot be read."""

import asyncio
import json

import pytest

from streams.catalog import Catalog
from streams.events import BadEvent, parse_event

from devtools.noetl_samples import CACHE_SIMPLE, as_message, python_playbook_initialized, register, rust_playbook_started


def start(execution_id, catalog_id, path="test/cache_simple", **extra):
    row = rust_playbook_started(execution_id, catalog_id, path, {})
    row.update(extra)
    return parse_event(*as_message(row), max_bytes=10**6)


@pytest.fixture
def catalog_settings(settings):
    return settings.model_copy(update={"catalog_schema": settings.schema_name, "catalog_wait_seconds": 0.3})


async def test_by_id_cached_a_row_never_changes(catalog_settings, keychain, db, execution_id):
    await register(db, catalog_settings.schema_name, execution_id, "test/cache_simple", CACHE_SIMPLE)
    catalog = Catalog(catalog_settings, keychain.pool)
    playbooks = await asyncio.gather(*(catalog.playbook_for(start(execution_id + i, execution_id)) for i in range(50)))
    assert all(p is playbooks[0] for p in playbooks)  # one parse, shared by a burst
    assert playbooks[0]["metadata"]["path"] == "test/cache_simple"
    await db.execute("DELETE FROM catalog")
    assert await catalog.playbook_for(start(execution_id, execution_id)) is playbooks[0]  # from the cache


async def test_by_path_newest_version_or_the_given_one(catalog_settings, keychain, db, execution_id):
    await register(db, catalog_settings.schema_name, execution_id, "p/x", "workload: {v: 1}", version=1)
    await register(db, catalog_settings.schema_name, execution_id + 1, "p/x", "workload: {v: 2}", version=2)
    catalog = Catalog(catalog_settings, keychain.pool)
    # a Python engine record without a catalog id, only the path
    row = python_playbook_initialized(execution_id, 0, "p/x", {})
    event = parse_event(*as_message(row), max_bytes=10**6)
    assert event.catalog_id is None and (await catalog.playbook_for(event))["workload"] == {"v": 2}
    ours = parse_event(None, json.dumps({"event_type": "execution.started", "execution_id": 5, "playbook": "p/x",
                                         "playbook_version": 1}).encode(), max_bytes=10**6)
    assert (await catalog.playbook_for(ours))["workload"] == {"v": 1}


async def test_missing_rows_unreadable_tables_and_bad_yaml(catalog_settings, keychain, db, execution_id):
    catalog = Catalog(catalog_settings, keychain.pool)
    with pytest.raises(BadEvent) as caught:  # no catalog table at all in this schema
        await catalog.playbook_for(start(execution_id, execution_id))
    assert caught.value.reason == "playbook_not_found"
    await register(db, catalog_settings.schema_name, execution_id, "bad", "workflow: [unclosed")
    for _ in range(2):  # the refusal is remembered too: a row never changes
        with pytest.raises(BadEvent) as caught:
            await catalog.playbook_for(start(execution_id, execution_id))
        assert caught.value.reason == "invalid_playbook"

    async def register_later():
        await asyncio.sleep(0.1)
        await register(db, catalog_settings.schema_name, execution_id + 1, "late", "workload: {}")

    late, _ = await asyncio.gather(catalog.playbook_for(start(execution_id, execution_id + 1)), register_later())
    assert late == {"workload": {}}  # a row that appears while the event waits is found
    with pytest.raises(BadEvent) as caught:
        await catalog.playbook_for(start(execution_id, execution_id + 99))
    assert caught.value.reason == "playbook_not_found"


async def test_the_cache_is_bounded(catalog_settings, keychain, db, execution_id):
    for i in range(3):
        await register(db, catalog_settings.schema_name, execution_id + i, f"p/{i}", f"workload: {{i: {i}}}")
    catalog = Catalog(catalog_settings, keychain.pool)
    catalog.cache_size = 2
    for i in range(3):
        await catalog.playbook_for(start(execution_id, execution_id + i))
    assert list(catalog._cache) == [execution_id + 1, execution_id + 2]  # size 2: the least recently used went


async def test_a_catalog_in_another_database_has_its_own_pool(catalog_settings, keychain, db, execution_id):
    await register(db, catalog_settings.schema_name, execution_id, "p/own", "workload: {own: true}")
    elsewhere = catalog_settings.model_copy(update={"catalog_dsn": catalog_settings.dsn})
    catalog = await Catalog.open(elsewhere, keychain.pool)
    try:
        assert catalog.pool is not keychain.pool
        assert await catalog.playbook_for(start(execution_id, execution_id)) == {"workload": {"own": True}}
    finally:
        await catalog.close()


async def test_a_batch_looks_each_row_up_once(catalog_settings, keychain, db, execution_id):
    await register(db, catalog_settings.schema_name, execution_id, "test/cache_simple", CACHE_SIMPLE)
    catalog = Catalog(catalog_settings, keychain.pool)
    loads = []
    real_load = catalog._load

    async def counted_load(key):
        loads.append(key)
        return await real_load(key)

    catalog._load = counted_load
    inline = parse_event(None, json.dumps({"event_type": "playbook.initialized", "execution_id": 7, "workload": {},
                                           "playbook": {"workload": {"inline": True}}}).encode(), max_bytes=10**6)
    events = [start(execution_id + i, execution_id) for i in range(50)]
    events += [inline, start(execution_id, execution_id + 99)]
    found = await catalog.playbooks_for(events)
    assert sorted(loads) == [("id", execution_id), ("id", execution_id + 99)]  # one per row, not one per event
    assert all(p is found[0] for p in found[:50]) and found[0]["metadata"]["path"] == "test/cache_simple"
    assert found[50] == {"workload": {"inline": True}}  # an event's own playbook is its own
    assert isinstance(found[51], BadEvent) and found[51].reason == "playbook_not_found"  # in its place, not raised

"""No caller of the library ever gets a driver error: errors the real database raises (injected by a trigger, or a
table taken away) come out as `keychain.errors` types, a deadlock is retried and counted, and a read-through whose
row cannot be written still returns the value it fetched."""

import inspect

import asyncpg
import pytest

from keychain.invalidation import Selection
from keychain import Keychain, metrics
from keychain.errors import InvalidArgument, KeychainConflict, KeychainDatabaseError, KeychainError
from keychain.model import Scope

PROJECT = "test-project"


def ref_of(secret_id: str) -> str:
    return f"projects/{PROJECT}/secrets/{secret_id}/versions/latest"


def retries(reason: str) -> float:
    return sum(s.value for s in metrics.DATABASE_RETRIES.collect()[0].samples
               if s.name.endswith("_total") and s.labels.get("reason") == reason)


async def inject(db: asyncpg.Connection, sqlstate: str, times: int | None) -> None:
    """A trigger on the keychain table that raises `sqlstate` on the first `times` writes (every write: None). The
    count is a sequence, which a rollback does not undo."""
    limit = "true" if times is None else f"nextval('injected_faults') <= {times}"
    await db.execute(f"""
        CREATE SEQUENCE injected_faults;
        CREATE FUNCTION inject_fault() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF {limit} THEN RAISE EXCEPTION 'injected' USING ERRCODE = '{sqlstate}'; END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER inject_fault BEFORE INSERT OR UPDATE ON keychain FOR EACH ROW EXECUTE FUNCTION inject_fault();
    """)


def test_every_public_method_turns_driver_errors_into_typed_ones():
    """Of every layer a caller reaches: the readers' Keychain, and the rows, fetcher and maintenance it hands on."""
    from keychain.fetcher import Fetcher
    from keychain.maintenance import Maintenance
    from keychain.rows import Rows

    public = [(layer, name) for layer in (Keychain, Rows, Fetcher, Maintenance)
              for name, member in inspect.getmembers(layer, inspect.iscoroutinefunction) if not name.startswith("_")]
    assert len(public) > 20
    untyped = [f"{layer.__name__}.{name}" for layer, name in public
               if not getattr(getattr(layer, name), "typed_errors", False)]
    assert not untyped, f"public methods that may hand a caller the driver's errors: {untyped}"


@pytest.mark.parametrize("sqlstate, reason", [("40P01", "deadlock"), ("40001", "serialization")])
async def test_a_write_rolled_back_for_a_concurrent_one_is_retried_and_counted(keychain, db, execution_id, sqlstate,
                                                                               reason):
    await inject(db, sqlstate, times=2)
    before = retries(reason)
    await keychain.put("retried", {"v": 1}, execution_id=execution_id)
    assert retries(reason) == before + 2
    assert (await keychain.get("retried", execution_id=execution_id)).value == {"v": 1}


async def test_a_write_that_never_commits_is_a_typed_error_but_a_read_through_returns_its_value(
        keychain, db, sm, secret, execution_id):
    secret_id, value = secret
    await inject(db, "40P01", times=None)
    before = retries("deadlock")
    with pytest.raises(KeychainConflict) as raised:
        await keychain.put("never", "x", execution_id=execution_id)
    assert "injected" not in str(raised.value) and raised.value.__cause__ is None
    lookup = await keychain.get_or_fetch("through", ref_of(secret_id), execution_id=execution_id)
    assert (lookup.outcome, lookup.value) == ("direct", value)  # served, though the row could not be written
    assert sm.access_count(secret_id) == 1
    assert retries("deadlock") == before + 6  # two writes, each tried four times
    assert await db.fetchval("SELECT count(*) FROM keychain") == 0


async def test_every_other_database_error_is_a_typed_error_without_the_drivers_text(
        keychain, db, sm, secret, execution_id):
    secret_id, value = secret
    await inject(db, "XX000", times=None)  # internal_error, as a broken extension or trigger raises it
    with pytest.raises(KeychainDatabaseError, match="SQLSTATE XX000") as raised:
        await keychain.put("refused", value, execution_id=execution_id)
    assert value not in str(raised.value) and "injected" not in str(raised.value)
    await db.execute("DROP TRIGGER inject_fault ON keychain")
    await keychain.put("kept", "v", execution_id=execution_id)
    await db.execute("ALTER TABLE keychain RENAME TO keychain_gone")  # an operator's mistake, a wrong schema
    try:
        identity = Scope.of(execution_id=execution_id).identity("kept")
        calls = [lambda: keychain.get("kept", execution_id=execution_id), keychain.maintenance.stats,
                 keychain.maintenance.sweep, lambda: keychain.maintenance.finish_execution(execution_id),
                 lambda: keychain.maintenance.invalidate(Selection.of(credential="kept")),
                 lambda: keychain.rows.existing([identity]), keychain.maintenance.rekey]
        for call in calls:
            with pytest.raises(KeychainError) as raised:
                await call()
            assert isinstance(raised.value, KeychainDatabaseError), type(raised.value).__name__
        lookup = await keychain.get_or_fetch("kept", ref_of(secret_id), execution_id=execution_id)
        assert (lookup.outcome, lookup.value) == ("direct", value)  # the cache only makes a read slower
    finally:
        await db.execute("ALTER TABLE keychain_gone RENAME TO keychain")


async def test_arguments_the_keychain_cannot_take_are_typed_errors(keychain):
    with pytest.raises(InvalidArgument):
        await keychain.get("x", execution_id=1, session_id="s")
    with pytest.raises(InvalidArgument):
        await keychain.maintenance.invalidate(Selection.of(credential="a", execution_id=1))
    with pytest.raises(InvalidArgument):
        await keychain.put("x", 1, scope="everyone")


async def test_a_closed_keychain_says_so_in_a_typed_error(settings):
    closed = Keychain(settings)
    with pytest.raises(KeychainError, match="not open"):
        await closed.get("x")

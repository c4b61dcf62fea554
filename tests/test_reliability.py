"""Faults with nothing lost: the database restarted under the worker, a flaky Secret Manager, bad input fuzzed."""

import asyncio
import json
import random

import asyncpg
import grpc
import pytest

from .streams_harness import Worker, consume, create_topics, produce, start_event, wait_for, worker_env

REF = "projects/test-project/secrets/{}/versions/latest"


async def count_rows(dsn, schema, query="SELECT count(*) FROM keychain", *args):
    """Poll through a fresh connection: the database may be restarting."""
    try:
        conn = await asyncpg.connect(dsn, server_settings={"search_path": schema}, timeout=2)
    except (OSError, asyncpg.PostgresError, asyncio.TimeoutError):
        return None
    try:
        return await conn.fetchval(query, *args)
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
        return None
    finally:
        await conn.close()


@pytest.fixture
async def topics(stack, unique):
    await create_topics(stack.env["KAFKA_BOOTSTRAP_SERVERS"], f"events-{unique}", f"dlq-{unique}")


async def test_postgres_restarted_mid_stream_loses_nothing(stack, settings, key_spec, unique, keychain, sm,
                                                          topics, execution_id):
    if stack.postgres is None:
        pytest.skip("KEYCHAIN_DSN points at an external PostgreSQL this test cannot restart")
    secret_ids = [f"pg{i}-{unique}" for i in range(4)]
    for s in secret_ids:
        sm.create_secret(s)
        sm.add_version(s, f"value-{s}")
    sm.delay_seconds = 0.02
    worker = Worker(worker_env(stack, settings, key_spec, unique, KEYCHAIN_WARM_BATCH_SIZE="10")).start()
    try:
        total = 200
        messages = [start_event(execution_id + i, [REF.format(secret_ids[i % 4])]) for i in range(total)]
        restarting = asyncio.Event()

        async def paced() -> None:
            """Some events before the restart, the rest while the database goes down and comes back: the worker has
            events to write during the outage (a worker idle through a restart meets nothing: its pool reconnects on
            the next acquire, so the test must not depend on the moment the restart happens to fall)."""
            await produce(stack.env["KAFKA_BOOTSTRAP_SERVERS"], f"events-{unique}", messages[:40])
            await restarting.wait()
            for i in range(40, total, 5):
                await produce(stack.env["KAFKA_BOOTSTRAP_SERVERS"], f"events-{unique}", messages[i:i + 5])
                await asyncio.sleep(0.02)

        producing = asyncio.create_task(paced())

        async def some_progress():
            return (await count_rows(settings.dsn, settings.schema_name) or 0) > 20

        await wait_for(some_progress, 60, "progress before the restart")
        restarting.set()
        await asyncio.to_thread(stack.postgres.restart)  # fast shutdown: every connection is cut
        await producing

        async def all_warmed():
            return await count_rows(settings.dsn, settings.schema_name) == total

        await wait_for(all_warmed, 120, "every event warmed after the restart")
        duplicates = await count_rows(settings.dsn, settings.schema_name,
                                      "SELECT count(*) FROM (SELECT execution_id FROM keychain GROUP BY 1 "
                                      "HAVING count(*) > 1) d")
        assert duplicates == 0
        assert "database unavailable; retrying" in worker.output  # it did meet the outage, and recovered by itself
    finally:
        worker.stop()


async def test_readers_across_a_database_restart_only_get_slower(stack, keychain, sm, secret, execution_id):
    """While PostgreSQL restarts, `get` raises KeychainUnavailable (never a driver error) and `get_or_fetch` serves
    the value straight from Secret Manager; once the database is back, reads are hits again by themselves."""
    from keychain import KeychainUnavailable

    if stack.postgres is None:
        pytest.skip("KEYCHAIN_DSN points at an external PostgreSQL this test cannot restart")
    secret_id, value = secret
    ref = REF.format(secret_id)
    assert (await keychain.get_or_fetch(ref, ref, execution_id=execution_id)).value == value
    outcomes: dict[str, int] = {}
    unexpected: list[str] = []
    restarted = asyncio.Event()
    stop = asyncio.Event()

    async def reader():
        while not stop.is_set():
            after = "after" if restarted.is_set() else "during"
            try:
                lookup = await keychain.get_or_fetch(ref, ref, execution_id=execution_id)
                assert lookup.value == value
                outcomes[f"{lookup.outcome} {after}"] = outcomes.get(f"{lookup.outcome} {after}", 0) + 1
            except Exception as exc:
                unexpected.append(f"get_or_fetch: {type(exc).__name__}")
            try:
                await keychain.get(ref, execution_id=execution_id)
            except KeychainUnavailable:
                outcomes["typed error"] = outcomes.get("typed error", 0) + 1
            except Exception as exc:
                unexpected.append(f"get: {type(exc).__name__}")
            await asyncio.sleep(0.005)

    readers = [asyncio.create_task(reader()) for _ in range(4)]
    await asyncio.to_thread(stack.postgres.restart)  # fast shutdown: every connection is cut
    restarted.set()

    async def hits_again():
        return outcomes.get("hit after", 0) > 20

    try:
        await wait_for(hits_again, 60, "hits again after the restart")
    finally:
        stop.set()
        await asyncio.gather(*readers)
    assert unexpected == []
    assert outcomes.get("direct during", 0) > 0 and outcomes.get("typed error", 0) > 0, outcomes


async def test_flaky_secret_manager_warms_everything_in_the_end(stack, settings, key_spec, unique, keychain, sm,
                                                               topics, execution_id):
    secret_ids = [f"fl{i}-{unique}" for i in range(10)]
    for s in secret_ids:
        sm.create_secret(s)
        sm.add_version(s, f"value-{s}")
    sm.delay_seconds = 0.05
    for s in secret_ids:
        # The first two calls for every secret fail for certain (shared fetches make about one call per secret, so a
        # random rate alone could leave the faults unexercised), then 30% at random.
        sm.inject(grpc.StatusCode.UNAVAILABLE, times=2, secret=s)
        sm.inject(grpc.StatusCode.UNAVAILABLE, rate=0.3, secret=s)
    missing = REF.format(f"absent-{unique}")
    executions = 100
    events = [start_event(execution_id + i, [REF.format(secret_ids[(i + k) % 10]) for k in range(3)])
              for i in range(executions)]
    events += [start_event(execution_id + 1000 + i, [missing]) for i in range(5)]
    worker = Worker(worker_env(stack, settings, key_spec, unique, KEYCHAIN_WARM_BATCH_SIZE="25")).start()
    try:
        await produce(stack.env["KAFKA_BOOTSTRAP_SERVERS"], f"events-{unique}", events)
        ready = "SELECT count(*) FROM keychain WHERE state = 'ready'"

        async def all_warmed():
            return await keychain.pool.fetchval(ready) == executions * 3

        await wait_for(all_warmed, 120, "all executions warmed despite 30% UNAVAILABLE")
    finally:
        worker.stop()
    injected = [sm.access_count(s, code="UNAVAILABLE") for s in secret_ids]
    assert min(injected) >= 2, injected  # the faults really happened, for every secret
    assert sm.access_count(f"absent-{unique}", code="NOT_FOUND") == 1  # then the negative cache answered
    dead = await consume(stack.env["KAFKA_BOOTSTRAP_SERVERS"], f"dlq-{unique}", 5)
    assert [dict(m.headers)["reason"] for m in dead] == [b"secret_not_found"] * 5
    for i in range(0, executions, 17):
        for k in range(3):
            ref = REF.format(secret_ids[(i + k) % 10])
            assert (await keychain.get(ref, execution_id=execution_id + i)).value == f"value-{secret_ids[(i + k) % 10]}"


def random_message(rng: random.Random, execution_id: int) -> tuple[bytes | None, bytes]:
    """Mostly-plausible garbage: broken JSON, wrong types, bad templates and references, a wrong key; and other
    event types, which are ignored (not dead-lettered)."""
    choice = rng.randrange(11)
    key = str(execution_id).encode() if rng.random() < 0.8 else None
    if choice == 0:
        return key, rng.randbytes(rng.randrange(1, 200))
    if choice == 1:
        return key, json.dumps(rng.choice([[], "x", 1, None, {"event_type": 1}])).encode()
    if choice == 2:
        return key, json.dumps({"event_type": "execution.started", "execution_id": rng.choice(["x", -1, 2**70])}).encode()
    if choice == 3:
        return key, json.dumps({"event_type": f"step.{rng.randrange(9)}", "execution_id": execution_id}).encode()
    if choice == 4:
        return key, json.dumps({"event_type": "execution.started", "execution_id": execution_id,
                                "credentials": [{"ref": "{{ workload.missing }}"}]}).encode()
    if choice == 5:
        return key, json.dumps({"event_type": "execution.started", "execution_id": execution_id,
                                "credentials": [{"ref": "{% for x in y %}"}]}).encode()
    if choice == 6:
        return key, json.dumps({"event_type": "execution.started", "execution_id": execution_id,
                                "credentials": [{"ref": "projects/p/not-a-secret"}]}).encode()
    if choice == 8:
        return key, b'{"event_type": "execution.started", "execution_id": 1, "x": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    if choice == 9:
        return key, json.dumps({"event_type": "execution.started", "execution_id": execution_id, "credentials": [
            {"ref": "projects/p/secrets/s", "name": rng.choice(["nul\x00", "lone\ud800", "n" * 5000])}]}).encode()
    if choice == 10:
        return key, json.dumps({"event_type": "execution.started", "execution_id": execution_id, "credentials": [
            {"ref": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"}]}).encode()
    return b"999", json.dumps({"event_type": "execution.completed", "execution_id": execution_id}).encode()


async def test_fuzzed_stream_dead_letters_every_bad_input_and_keeps_going(stack, settings, key_spec, unique,
                                                                         keychain, sm, secret, topics, execution_id):
    from streams.events import BadEvent, parse_event
    from streams.resolve import resolve

    secret_id, _ = secret
    rng = random.Random(unique)
    messages, bad, valid = [], 0, []
    for i in range(400):
        if i % 20 == 0:
            valid.append(execution_id + i)
            messages.append(start_event(execution_id + i, [REF.format(secret_id)]))
            continue
        key, value = random_message(rng, execution_id + i)
        try:
            resolve(parse_event(key, value, max_bytes=1_048_576))
        except BadEvent:
            bad += 1
        messages.append((key, value))
    assert bad > 300
    worker = Worker(worker_env(stack, settings, key_spec, unique)).start()
    try:
        await produce(stack.env["KAFKA_BOOTSTRAP_SERVERS"], f"events-{unique}", messages)

        async def valid_warmed():
            return await keychain.pool.fetchval("SELECT count(*) FROM keychain") == len(valid)

        await wait_for(valid_warmed, 60, "every valid event warmed")
        dead = await consume(stack.env["KAFKA_BOOTSTRAP_SERVERS"], f"dlq-{unique}", bad, timeout=30)
    finally:
        worker.stop()
    assert len(dead) == bad
    assert all(dict(m.headers).get("reason") for m in dead)
    assert "Traceback" not in worker.output

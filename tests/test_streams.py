
import asyncio
import hashlib

import pytest

from keychain import CachedFailure

from .streams_harness import consume, finish_event, start_event, wait_for

REF = "projects/test-project/secrets/{}/versions/latest"


async def test_two_seed_executions_first_read_is_a_hit(streams, keychain, sm, secret, execution_id):
    secret_id, value = secret
    ref = REF.format(secret_id)
    playbook = {"path": "test/cache_simple", "workflow": [
        {"step": step, "tool": {"kind": "http", "auth": {"openai": {
            "type": "bearer", "provider": "secret_manager", "key": "{{ workload.openai_secret_path }}"}}}}
        for step in ("first_openai_call", "second_openai_call")]}
    streams.start_worker()
    executions = [execution_id, execution_id + 1]
    await streams.send(*[start_event(e, [], workload={"openai_secret_path": ref}, playbook=playbook)
                         for e in executions])
    for e in executions:
        await wait_for(lambda: streams.rows(e), what="warm rows")
        first = await keychain.get(ref, execution_id=e)  # what the worker's first step asks
        assert first.outcome == "hit" and first.value == value
    assert sm.access_count(secret_id) == 1  # one fetch for both executions
    # on uvloop when the environment does not name a loop (F_LOOP): about a tenth less CPU per event
    await wait_for(lambda: _async("event loop: uvloop" in streams.worker.output), what="the event loop's line")


async def test_many_executions_one_secret_manager_call(streams, keychain, sm, secret, execution_id):
    secret_id, value = secret
    sm.delay_seconds = 0.25
    streams.start_worker()
    await streams.send(*[start_event(execution_id + i, [REF.format(secret_id)]) for i in range(200)])
    await wait_for(lambda: _equals(streams.rows(), 200), what="200 warm rows")
    assert sm.access_count(secret_id) == 1
    assert (await keychain.get(REF.format(secret_id), execution_id=execution_id + 199)).value == value


async def test_an_execution_starting_during_a_fetch_is_not_held_behind_it(streams, keychain, sm, unique,
                                                                           execution_id):
    """Batches run side by side while one waits for Secret Manager: an execution whose secret is at hand is warmed
    while an earlier execution's call is still in flight (KEYCHAIN_WARM_BATCHES_IN_FLIGHT), and the earlier one is
    warmed once its call returns."""
    slow, quick = f"slow-{unique}", f"quick-{unique}"
    for secret_id in (slow, quick):
        sm.create_secret(secret_id)
        sm.add_version(secret_id, f"value-of-{secret_id}")
    sm.hold(slow)
    streams.start_worker()
    await streams.send(start_event(execution_id, [REF.format(slow)]))
    await wait_for(lambda: _async(sm.holding[slow] == 1), what="the slow secret's call in flight")
    await streams.send(start_event(execution_id + 1, [REF.format(quick)]))
    await wait_for(lambda: streams.rows(execution_id + 1), what="the second execution warmed")
    assert sm.holding[slow] == 1 and await streams.rows(execution_id) == 0  # the first still waits for its call
    sm.release(slow)
    await wait_for(lambda: streams.rows(execution_id), what="the first execution warmed")
    assert (await keychain.get(REF.format(slow), execution_id=execution_id)).value == f"value-of-{slow}"
    assert sm.access_count(slow) == 1 and sm.access_count(quick) == 1


async def _async(value):
    return value


async def _equals(coroutine, expected):
    return await coroutine == expected


async def test_finish_purges_and_a_racing_warm_leaves_nothing(streams, keychain, sm, secret, execution_id):
    secret_id, _ = secret
    streams.start_worker()
    await streams.send(start_event(execution_id, [REF.format(secret_id)]))
    await wait_for(lambda: streams.rows(execution_id), what="warm")
    await streams.send(finish_event(execution_id, "playbook.completed"))
    await wait_for(lambda: _equals(streams.rows(execution_id), 0), what="purge")

    sm.delay_seconds = 0.3  # the warms are still fetching when their finishes arrive
    racing = [execution_id + 100 + i for i in range(20)]
    await streams.send(*[m for e in racing for m in (start_event(e, [REF.format(secret_id)]), finish_event(e))])
    await streams.send(start_event(execution_id + 999, [REF.format(secret_id)]))  # a marker after them
    await wait_for(lambda: streams.rows(execution_id + 999), what="the marker warmed")
    for e in racing:
        assert await streams.rows(e) == 0
    # A redelivered start of a finished execution writes nothing either.
    await streams.send(start_event(racing[0], [REF.format(secret_id)]), start_event(execution_id + 998, [REF.format(secret_id)]))
    await wait_for(lambda: streams.rows(execution_id + 998), what="second marker")
    assert await streams.rows(racing[0]) == 0


async def test_bad_events_go_to_the_dlq_and_the_stream_goes_on(streams, keychain, sm, secret, execution_id):
    secret_id, _ = secret
    streams.start_worker(KEYCHAIN_MAX_EVENT_BYTES="100000")
    bad = [
        (None, b"{not json"),
        (b"1", b'{"event_type": "execution.started"}'),
        (b"2", b'{"event_type": "step.finished", "execution_id": 2}'),
        (b"3", b'{"event_type": "execution.started", "execution_id": 3, "credentials": [{"ref": "{{ workload.nope }}"}]}'),
        (b"4", b"x" * 200_000),
    ]
    await streams.send(*bad, start_event(execution_id, [REF.format(secret_id)]))
    await wait_for(lambda: streams.rows(execution_id), what="the valid event after the bad ones")
    dead = await consume(streams.bootstrap, streams.dlq, len(bad) - 1)
    reasons = sorted(dict(m.headers)["reason"].decode() for m in dead)
    assert reasons == sorted(["malformed_json", "invalid_event", "bad_template", "too_large"])
    assert {m.value for m in dead} == {v for k, v in bad if k != b"2"}  # the original bytes; step.finished is ignored


async def test_secret_manager_refusals(streams, keychain, sm, secret, unique, execution_id):
    import grpc

    secret_id, value = secret
    missing = REF.format(f"missing-{unique}")
    sm.inject(grpc.StatusCode.UNAVAILABLE, times=3, secret=secret_id)
    streams.start_worker()
    await streams.send(*[start_event(execution_id + i, [missing]) for i in range(30)],
                       start_event(execution_id + 100, [REF.format(secret_id)]))
    await wait_for(lambda: streams.rows(execution_id + 100), what="warm despite UNAVAILABLE")
    assert (await keychain.get(REF.format(secret_id), execution_id=execution_id + 100)).value == value
    await wait_for(lambda: streams.rows(execution_id + 29), what="failed rows")
    with pytest.raises(CachedFailure, match="NOT_FOUND"):
        await keychain.get(missing, execution_id=execution_id + 5)
    assert sm.access_count(f"missing-{unique}", code="NOT_FOUND") == 1  # then the negative cache answers
    assert sm.access_count(secret_id, code="UNAVAILABLE") == 3 and sm.access_count(secret_id) == 1
    dead = await consume(streams.bootstrap, streams.dlq, 30)
    assert {dict(m.headers)["reason"] for m in dead} == {b"secret_not_found"} and len(dead) == 30


async def test_worker_killed_mid_batch_loses_nothing(streams, keychain, sm, unique, execution_id):
    secret_ids = [f"k{i}-{unique}" for i in range(5)]
    for s in secret_ids:
        sm.create_secret(s)
        sm.add_version(s, f"value-{s}")
    sm.delay_seconds = 0.1
    total = 300
    worker = streams.start_worker(KEYCHAIN_WARM_BATCH_SIZE="20")
    await streams.send(*[start_event(execution_id + i, [REF.format(secret_ids[i % 5])]) for i in range(total)])
    for _ in range(2):
        await wait_for(lambda: streams.rows(), what="some progress")
        worker.kill()
        worker.start()
    await wait_for(lambda: _equals(streams.rows(), total), timeout=90, what="every event warmed")
    duplicates = await keychain.pool.fetchval(
        "SELECT count(*) FROM (SELECT execution_id FROM keychain GROUP BY 1 HAVING count(*) > 1) d")
    assert duplicates == 0


async def test_leader_sweeps_expired_rows(streams, keychain, execution_id):
    for i in range(10):
        await keychain.put(f"c{i}", i, execution_id=execution_id, ttl_seconds=3600)
    await keychain.pool.execute("UPDATE keychain SET expires_at = now() WHERE credential_name IN ('c1', 'c2', 'c3')")
    streams.start_worker(KEYCHAIN_SWEEP_INTERVAL_SECONDS="0.5")
    await wait_for(lambda: _equals(streams.rows(), 7), what="the sweep")
    # The line is printed just after the sweep commits, and read from the worker's output by a thread.
    await wait_for(lambda: _async("sweep: 3 expired rows deleted" in streams.worker.output), what="the sweep's line")


async def test_one_bad_event_never_takes_its_batch_with_it(streams, keychain, sm, secret, execution_id):
    """Hostile events, each beside a valid one in the same produce call: the valid ones are warmed, each hostile one
    is dead-lettered with its own reason, the worker stays healthy."""
    import json

    from aiokafka import AIOKafkaProducer

    from .test_web import http

    secret_id, _ = secret
    ref = REF.format(secret_id)
    worker = streams.start_worker()
    loop_bomb = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"

    def started(e, **extra):
        return str(e).encode(), json.dumps({"event_type": "execution.started", "execution_id": e, **extra}).encode()

    hostile = {
        "invalid_event": [
            (None, b'{"event_type": "execution.started", "execution_id": 1, "x": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"),
            (None, b'{"event_type": "execution.started", "execution_id": ' + b"7" * 5000 + b"}"),
            started(execution_id + 50, credentials=[{"ref": ref, "name": "nul\x00name"}]),
            started(execution_id + 51, credentials=[{"ref": ref, "name": "n" * 5000}]),
            started(execution_id + 52, credentials=[{"ref": ref, "name": "lone\ud800surrogate"}]),
        ],
        "bad_template": [started(execution_id + 53, credentials=[{"ref": loop_bomb}])],
        "too_large": [(None, b'{"event_type": "execution.started", "pad": "' + b"x" * 1_100_000 + b'"}')],
    }
    valid = [start_event(execution_id + i, [ref]) for i in range(len(hostile) + 4)]
    messages = [m for pair in zip(valid, [m for ms in hostile.values() for m in ms]) for m in pair] + valid[-1:]
    producer = AIOKafkaProducer(bootstrap_servers=streams.bootstrap, acks="all", max_request_size=6 * 2**20)
    await producer.start()
    try:
        batch = [await producer.send(streams.events, value, key=key) for key, value in messages]
        await asyncio.gather(*batch)
    finally:
        await producer.stop()
    for key, _ in valid:
        await wait_for(lambda: streams.rows(int(key)), what="every valid event of the batch warmed")
    expected = sorted(reason for reason, ms in hostile.items() for _ in ms)
    dead = await consume(streams.bootstrap, streams.dlq, len(expected))
    assert sorted(dict(m.headers)["reason"].decode() for m in dead) == expected
    big = next(m for m in dead if dict(m.headers)["reason"] == b"too_large")
    assert len(big.value) <= 256 * 1024 and int(dict(big.headers)["original_value_bytes"]) > 1_100_000
    assert dict(big.headers)["original_value_sha256"].decode() == hashlib.sha256(hostile["too_large"][0][1]).hexdigest()
    assert http(int(worker.env["KEYCHAIN_WEB_PORT"]), "/healthz")[0] == 200
    assert "Traceback" not in worker.output

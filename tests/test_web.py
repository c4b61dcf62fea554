"""The worker's HTTP endpoints, over real HTTP, against a real worker."""

import json
import urllib.error
import urllib.request

import pytest

from .streams_harness import HTTP_BODIES, Worker, create_topics, produce, start_event, wait_for, worker_env

TOKEN = "admin-token-for-tests"


def http(port, path, *, method="GET", body=None, token=None, raw: bytes | None = None):
    data = raw if raw is not None else json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method, data=data)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        status, text = error.code, error.read().decode()
    HTTP_BODIES.append(text)
    return status, text


@pytest.fixture
async def worker(stack, settings, key_spec, unique):
    env = worker_env(stack, settings, key_spec, unique, KEYCHAIN_ADMIN_TOKEN=TOKEN)
    await create_topics(stack.env["KAFKA_BOOTSTRAP_SERVERS"], env["KEYCHAIN_EVENTS_TOPIC"], env["KEYCHAIN_DLQ_TOPIC"])
    running = Worker(env).start()
    running.port = int(env["KEYCHAIN_WEB_PORT"])
    running.events_topic = env["KEYCHAIN_EVENTS_TOPIC"]
    yield running
    running.stop()


async def test_health_readiness_metrics_and_stats(worker, stack, keychain, sm, secret, execution_id):
    secret_id, value = secret
    ref = f"projects/test-project/secrets/{secret_id}/versions/latest"
    assert http(worker.port, "/healthz") == (200, '{"status": "alive"}')
    status, body = http(worker.port, "/readyz")
    assert status == 200 and json.loads(body)["checks"] == {"database": "ok", "broker": "ok", "pubsub": "not configured",
                                                            "dead_letters": "ok"}
    await produce(stack.env["KAFKA_BOOTSTRAP_SERVERS"], worker.events_topic, [start_event(execution_id, [ref])])
    await produce(stack.env["KAFKA_BOOTSTRAP_SERVERS"], worker.events_topic, [(None, b"{broken")])

    async def warmed():
        return await keychain.pool.fetchval("SELECT count(*) FROM keychain") == 1

    await wait_for(warmed, what="warm")
    status, text = http(worker.port, "/metrics")
    assert status == 200
    for name in ("keychain_events_total", "keychain_secret_manager_calls_total", "keychain_rows_written_total",
                 "keychain_dead_letters_total", "keychain_read_seconds"):
        assert name in text
    assert 'keychain_secret_manager_calls_total{outcome="OK"} 1.0' in text
    assert value not in text and secret_id not in text  # no values, no secret names in labels

    async def dead_letter_counted():  # counted once the broker took it, which is after the batch's rows are written
        return json.loads(http(worker.port, "/stats")[1])["dead_letters"].get("malformed_json") == 1.0

    await wait_for(dead_letter_counted, what="the dead letter sent and counted")
    status, body = http(worker.port, "/stats")
    figures = json.loads(body)
    assert status == 200 and figures["events"]["start"] == 1.0 and figures["dead_letters"]["malformed_json"] == 1.0
    assert sum(r["rows"] for r in figures["rows_by_scope_and_state"]) == 1
    assert value not in body


async def test_invalidate_needs_the_token(worker, keychain, sm, secret, execution_id):
    secret_id, value = secret
    ref = f"projects/test-project/secrets/{secret_id}/versions/latest"
    await keychain.get_or_fetch(ref, ref, execution_id=execution_id)
    for token in (None, "wrong-token", TOKEN + "x"):
        status, _ = http(worker.port, "/invalidate", method="POST", body={"all": True}, token=token)
        assert status == 401
    assert await keychain.get(ref, execution_id=execution_id)  # nothing changed
    assert http(worker.port, "/invalidate", method="POST", body={"nonsense": 1}, token=TOKEN)[0] == 400
    assert http(worker.port, "/invalidate", method="POST", body={"secret": "not-a-ref"}, token=TOKEN)[0] == 400
    hostile = [b'{"execution_id": 18446744073709551616}', b'{"execution_id": 0}', b'{"execution_id": true}',
               b'{"credential": "nul\\u0000name"}', b'{"credential": "lone\\ud800"}', b'{"credential": ""}',
               b'{"all": false, "all": true}', b'{"x": ' + b"[" * 5000 + b"]" * 5000 + b"}", b"not json", b"[]",
               b'{"execution_id": 1, "all": true}']
    for raw in hostile:
        status, text = http(worker.port, "/invalidate", method="POST", raw=raw, token=TOKEN)
        assert status == 400 and "error" in json.loads(text), raw[:40]
    assert await keychain.get(ref, execution_id=execution_id)  # none of them changed anything
    assert "Traceback" not in worker.output
    import socket

    with socket.create_connection(("127.0.0.1", worker.port), timeout=10) as raw_http:  # a request line of 20 KB
        raw_http.sendall(b"GET /stats?" + b"t" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        assert raw_http.recv(64).startswith(b"HTTP/1.0 400")
    await wait_for(lambda: _async("refused a request it could not read (LineTooLong)" in worker.output),
                   what="one line for the unreadable request")
    assert "Traceback" not in worker.output and "t" * 100 not in worker.output
    sm.add_version(secret_id, "second-value")
    status, body = http(worker.port, "/invalidate", method="POST",
                        body={"secret": f"projects/1014428265962/secrets/{secret_id}"}, token=TOKEN)
    assert status == 200 and json.loads(body) == {"invalidated": 1, "refreshed": 1}
    assert (await keychain.get(ref, execution_id=execution_id)).value == "second-value"
    # an execution's rows: stopped, then refreshed at once (the one path of every invalidation)
    status, body = http(worker.port, "/invalidate", method="POST", body={"execution_id": execution_id}, token=TOKEN)
    assert status == 200 and json.loads(body) == {"invalidated": 1, "refreshed": 1}
    assert (await keychain.get(ref, execution_id=execution_id)).value == "second-value"
    # the first read, the secret's refresh, the execution's refresh: an operator's invalidation of anything fetches
    # anew (it never re-serves the value fetched a moment before it)
    assert sm.access_count(secret_id) == 3


async def test_invalidate_is_disabled_without_a_token(stack, settings, key_spec, unique):
    env = worker_env(stack, settings, key_spec, unique)
    await create_topics(stack.env["KAFKA_BOOTSTRAP_SERVERS"], env["KEYCHAIN_EVENTS_TOPIC"], env["KEYCHAIN_DLQ_TOPIC"])
    running = Worker(env).start()
    try:
        port = int(env["KEYCHAIN_WEB_PORT"])
        assert http(port, "/invalidate", method="POST", body={"all": True}, token="anything")[0] == 403
    finally:
        running.stop()


async def test_json_logs_for_production(stack, settings, key_spec, unique, keychain, sm, secret, execution_id):
    secret_id, value = secret
    env = worker_env(stack, settings, key_spec, unique, KEYCHAIN_LOG_FORMAT="json")
    await create_topics(stack.env["KAFKA_BOOTSTRAP_SERVERS"], env["KEYCHAIN_EVENTS_TOPIC"], env["KEYCHAIN_DLQ_TOPIC"])
    running = Worker(env).start()
    try:
        ref = f"projects/test-project/secrets/{secret_id}/versions/latest"
        await produce(stack.env["KAFKA_BOOTSTRAP_SERVERS"], env["KEYCHAIN_EVENTS_TOPIC"], [start_event(execution_id, [ref])])

        async def warmed():
            return await keychain.pool.fetchval("SELECT count(*) FROM keychain") == 1

        await wait_for(warmed, what="warm")
    finally:
        running.stop()
    records = [json.loads(line) for line in running.lines if line.startswith("{")]
    assert any("Ready" in r["message"] for r in records)
    assert any(r["message"].startswith("batch: 1 events") for r in records)
    assert value not in running.output


async def _async(value):
    return value


async def test_a_dead_letter_the_broker_does_not_take_holds_its_event_until_it_is_taken(stack, settings, key_spec,
                                                                                       unique, keychain, secret,
                                                                                       execution_id):
    """The real broker never takes a dead letter sent to a topic it cannot have ("not a topic!"): the batch is held,
    /readyz says so, its good event's rows are written, and its offsets are not committed. The next worker of the
    group, with a dead-letter topic that exists, gets the record again and dead-letters it: nothing is lost."""
    from .streams_harness import consume

    secret_id, value = secret
    bootstrap = stack.env["KAFKA_BOOTSTRAP_SERVERS"]
    ref = f"projects/test-project/secrets/{secret_id}/versions/latest"
    await create_topics(bootstrap, f"events-{unique}", f"dlq-{unique}", partitions=1)
    env = worker_env(stack, settings, key_spec, unique, KEYCHAIN_DLQ_TOPIC="not a topic!")
    refusing = Worker(env).start()
    try:
        await produce(bootstrap, f"events-{unique}", [(None, b"{broken"), start_event(execution_id, [ref])])

        async def held():
            status, body = http(int(env["KEYCHAIN_WEB_PORT"]), "/readyz")
            return status == 503 and json.loads(body)["checks"]["dead_letters"].startswith("not taken by the broker")

        await wait_for(held, 60, "/readyz saying the batch is held for its dead letter")
        assert (await keychain.get(ref, execution_id=execution_id)).value == value  # its rows are written all the same
    finally:
        refusing.stop()
    taking = Worker(worker_env(stack, settings, key_spec, unique)).start()
    try:
        dead = await consume(bootstrap, f"dlq-{unique}", 1, timeout=60)
        assert [(r.value, dict(r.headers)["reason"]) for r in dead] == [(b"{broken", b"malformed_json")]
    finally:
        taking.stop()

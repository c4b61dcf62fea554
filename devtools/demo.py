"""`python -m devtools demo` (`make demo`): the whole system on embedded defaults, with nothing else running.

Starts PostgreSQL, the Kafka-protocol broker, the Pub/Sub emulator (when installed) and the Secret Manager test
server (250 ms access latency, the seed's figure); migrates our tables into their own schema (`keychain_warmer`);
creates NoETL's own tables in `noetl` from NoETL's published columns (devtools/noetl_schema.py) and registers two
playbooks in its catalog as NoETL stores them (YAML text, bare templates): the seed's `test/cache_simple` and a
`kind: secrets` playbook; starts the worker with both targets (KEYCHAIN_TARGET=both: our table and NoETL's own
keychain) and its rotation bridge; then plays NoETL as it is: for each execution, NoETL's own event records (the
Rust server's `playbook_started` with the catalog id and the workload, written to NoETL's event table and on Kafka,
`workflow.initialized`, the records of every step, `playbook.completed`). The seed's executions read our table with
the keychain library; the `kind: secrets` executions are read the way NoETL's server reads its own keychain
(devtools/noetl_server.py: its cache key, its expiry check, its envelope). Then a rotation (AddSecretVersion ->
notification -> invalidation and refresh, in both tables), executions finishing (purge) and a sweep. One more
execution names a regional secret of the same id (`projects/P/locations/europe-west1/...`, fetched from its
location's endpoint), which the global secret's rotation leaves alone.
Stops everything it started. The last line is one JSON object with the figures.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import statistics
import time

import asyncpg
import grpc
from google.cloud.secretmanager_v1 import SecretManagerServiceClient
from google.cloud.secretmanager_v1.services.secret_manager_service.transports import SecretManagerServiceGrpcTransport

from keychain.crypto import KeyRing
from keychain.store import Keychain
from keychain.sources import SecretManagerSource

from streams.settings import WorkerSettings

from .local import WorkerProcess, consume, create_topics, local_worker_env, produce
from .noetl_samples import CACHE_SIMPLE, as_message, finish_record, rust_playbook_started, \
    rust_workflow_initialized, step_records
from .noetl_schema import create_noetl_tables, record_event, register_playbook
from .noetl_server import NoetlServerReads
from .stack import LocalStack, stop_on_signals

EXECUTIONS = [507861119290048685 + i for i in range(3)]
CATALOG_ID = 507861000000000001  # NoETL's catalog row of test/cache_simple
PATH = "test/cache_simple"
NOETL_EXECUTIONS = [507861119290049685 + i for i in range(3)]
NOETL_CATALOG_ID = 507861000000000002  # a playbook whose steps ask NoETL's server for `keychain.openai_token`
NOETL_PATH = "demo/openai_keychain"
NOETL_PLAYBOOK = """\
apiVersion: noetl.io/v2
kind: Playbook
metadata:
  name: openai_keychain
  path: demo/openai_keychain
workload:
  openai_secret_path: projects/{project}/secrets/openai-api-key
keychain:
  - name: openai_token
    kind: secrets
    provider: gcp
    map:
      api_key: '{{{{ openai_secret_path }}}}'
workflow:
  - step: start
    tool:
      kind: http
      url: https://api.openai.com/v1/models
      headers:
        Authorization: 'Bearer {{{{ keychain.openai_token.api_key }}}}'
"""
SECRET_ID = "openai-api-key"
REGION = "europe-west1"  # a regional secret of the same id: another secret
REGIONAL_EXECUTION = EXECUTIONS[-1] + 100
TOPIC = "secret-manager-events"
SUBSCRIPTION = "keychain-warmer"
STEP_GAP_SECONDS = 1.5  # from execution start to its first secret use (the seed measured 1.5 s)


def say(text: str) -> None:
    print(text, flush=True)


def records(*rows: dict) -> list[tuple[bytes, bytes]]:
    """NoETL's event records as its outbox relay publishes them to Kafka (keyed by the execution id)."""
    return [as_message(row) for row in rows]


async def play(stack: LocalStack) -> dict:
    env = stack.env
    server = stack.secret_manager
    project = env["GOOGLE_CLOUD_PROJECT"]
    pubsub = "PUBSUB_EMULATOR_HOST" in env
    noetl_key = base64.b64encode(os.urandom(32)).decode()  # NoETL's NOETL_ENCRYPTION_KEY
    settings = WorkerSettings(dsn=env["KEYCHAIN_DSN"], keys=env["KEYCHAIN_KEYS"],
                              secret_manager_endpoint=env["SECRET_MANAGER_ENDPOINT"], target="both",
                              noetl_encryption_key=noetl_key)
    await create_topics(env["KAFKA_BOOTSTRAP_SERVERS"], settings.events_topic, settings.dlq_topic,
                        settings.rotations_topic)
    worker_env = local_worker_env({**os.environ, **env}, "keychain-warmer-demo", KEYCHAIN_SWEEP_INTERVAL_SECONDS="1",
                                  KEYCHAIN_RECONCILE_INTERVAL_SECONDS="2", KEYCHAIN_LOG_LEVEL="INFO",
                                  KEYCHAIN_TARGET="both", NOETL_ENCRYPTION_KEY=noetl_key)
    topic = f"projects/{project}/topics/{TOPIC}"
    if pubsub:
        from google.cloud import pubsub_v1

        pubsub_v1.PublisherClient().create_topic(name=topic)
        subscription = pubsub_v1.SubscriberClient().create_subscription(
            name=f"projects/{project}/subscriptions/{SUBSCRIPTION}", topic=topic, ack_deadline_seconds=10).name
        worker_env["KEYCHAIN_ROTATION_SUBSCRIPTION"] = subscription
        say(f"[2/7] Pub/Sub topic {topic} -> subscription {subscription}")
    else:
        say("[2/7] Pub/Sub emulator not installed here: rotations will be caught by reconciliation instead")

    channel = grpc.insecure_channel(env["SECRET_MANAGER_ENDPOINT"])
    secrets = SecretManagerServiceClient(transport=SecretManagerServiceGrpcTransport(channel=channel))
    secret = secrets.create_secret(parent=f"projects/{project}", secret_id=SECRET_ID,
                                   secret={"topics": [{"name": topic}] if pubsub else []})
    secrets.add_secret_version(parent=secret.name, payload={"data": b"sk-demo-" + os.urandom(6).hex().encode()})
    ref = f"{secret.name}/versions/latest"
    regional = secrets.create_secret(parent=f"projects/{project}/locations/{REGION}", secret_id=SECRET_ID,
                                     secret={"topics": [{"name": topic}] if pubsub else []})
    secrets.add_secret_version(parent=regional.name, payload={"data": b"sk-eu-" + os.urandom(6).hex().encode()})
    regional_ref = f"{regional.name}/versions/latest"
    say(f"[3/7] secret {ref} and the regional {regional_ref} (access latency {server.delay_seconds * 1000:.0f} ms)")

    async with Keychain(settings, source=SecretManagerSource(settings)) as keychain:
        migrated = await keychain.migrate() or "up to date"
        noetl = settings.catalog_schema
        async with keychain.pool.acquire() as conn:  # NoETL's installation, and what its `catalog register` writes
            await create_noetl_tables(conn, noetl)
            await register_playbook(conn, noetl, CATALOG_ID, PATH, CACHE_SIMPLE)
            await register_playbook(conn, noetl, NOETL_CATALOG_ID, NOETL_PATH, NOETL_PLAYBOOK.format(project=project))
        say(f"[4/7] migrated {settings.schema_name}: {migrated}; NoETL's tables in {noetl}; {PATH} and {NOETL_PATH} "
            f"registered in {noetl}.catalog (YAML, bare templates); starting the worker (KEYCHAIN_TARGET=both) ...")
        worker = WorkerProcess(worker_env).start()
        reads = await asyncpg.connect(env["KEYCHAIN_DSN"])
        noetl_server = NoetlServerReads(reads, noetl, encryption_key=noetl_key,
                                        secret_manager_endpoint=env["SECRET_MANAGER_ENDPOINT"], project=project)
        try:
            return await scenario(keychain, noetl_server, server, secrets, secret.name, ref, env, pubsub,
                                  regional_ref)
        finally:
            await reads.close()
            worker.stop()
            channel.close()


async def noetl_started(noetl_server: NoetlServerReads, row: dict) -> dict:
    """NoETL's server starting an execution: its start record in its own event table (then on Kafka)."""
    await record_event(noetl_server.conn, noetl_server.schema, row)
    return row


async def scenario(keychain, noetl_server, server, secrets, secret_name, ref, env, pubsub, regional_ref) -> dict:
    bootstrap, events_topic = env["KAFKA_BOOTSTRAP_SERVERS"], keychain.settings.events_topic
    # The worker is consuming once a probe's finish event has fenced its execution id.
    probe = 1
    await produce(bootstrap, events_topic, records(finish_record(probe, CATALOG_ID)))
    fenced = "SELECT count(*) FROM keychain_finished_execution WHERE execution_id = $1"
    await wait(lambda: keychain.pool.fetchval(fenced, probe), 1)
    say(f"[5/7] {len(EXECUTIONS)} executions of {PATH}, as NoETL's records: playbook_started (catalog id and "
        f"workload only), workflow.initialized, each step's records; each execution reads {ref} in two steps")
    figures = {"first_use_hits": 0, "first_use_reads": 0, "second_use_hits": 0, "second_use_reads": 0}
    read_ms: dict[str, list[float]] = {"hit": [], "miss": []}
    for execution_id in EXECUTIONS:
        await produce(bootstrap, events_topic, records(
            rust_playbook_started(execution_id, CATALOG_ID, PATH, {"openai_secret_path": ref}),
            rust_workflow_initialized(execution_id, CATALOG_ID), *step_records(execution_id, CATALOG_ID, "start")))
        await asyncio.sleep(STEP_GAP_SECONDS)
        for step, prefix in (("first_openai_call", "first_use"), ("second_openai_call", "second_use")):
            await produce(bootstrap, events_topic, records(*step_records(execution_id, CATALOG_ID, step)))
            started = time.perf_counter()
            lookup = await keychain.get(ref, execution_id=execution_id)
            outcome = "hit" if lookup else "miss"
            if not lookup:
                lookup = await keychain.get_or_fetch(ref, ref, execution_id=execution_id)
            elapsed = (time.perf_counter() - started) * 1000
            read_ms[outcome].append(elapsed)
            figures[f"{prefix}_reads"] += 1
            figures[f"{prefix}_hits"] += outcome == "hit"
            say(f"      execution {execution_id}  {step:<19} {outcome.upper():<4} {elapsed:8.2f} ms")
    await produce(bootstrap, events_topic, records(
        rust_playbook_started(REGIONAL_EXECUTION, CATALOG_ID, PATH, {"openai_secret_path": regional_ref}),
        *step_records(REGIONAL_EXECUTION, CATALOG_ID, "start")))
    await asyncio.sleep(STEP_GAP_SECONDS)
    started = time.perf_counter()
    regional = await keychain.get(regional_ref, execution_id=REGIONAL_EXECUTION)
    say(f"      execution {REGIONAL_EXECUTION}  regional secret in {REGION}  {'HIT' if regional else 'MISS':<4} "
        f"{(time.perf_counter() - started) * 1000:8.2f} ms")
    say(f"      {len(NOETL_EXECUTIONS)} executions of {NOETL_PATH}: its step asks NoETL's server for "
        "keychain.openai_token, which reads NoETL's own keychain")
    noetl_figures = {"noetl_first_use_hits": 0, "noetl_first_use_reads": 0}
    for execution_id in NOETL_EXECUTIONS:
        start = await noetl_started(noetl_server, rust_playbook_started(execution_id, NOETL_CATALOG_ID, NOETL_PATH,
                                                                  {"openai_secret_path": ref}))
        await produce(bootstrap, events_topic, records(start, rust_workflow_initialized(execution_id, NOETL_CATALOG_ID),
                                                       *step_records(execution_id, NOETL_CATALOG_ID, "start")))
        await asyncio.sleep(STEP_GAP_SECONDS)
        started_at = time.perf_counter()
        answer = await noetl_server.get_credential("openai_token", execution_id)
        elapsed = (time.perf_counter() - started_at) * 1000
        noetl_figures["noetl_first_use_reads"] += 1
        noetl_figures["noetl_first_use_hits"] += answer.source == "keychain"
        outcome = "HIT" if answer.source == "keychain" else "MISS (NoETL's server called Secret Manager)"
        say(f"      execution {execution_id}  NoETL server, cache key openai_token:{NOETL_CATALOG_ID}:{execution_id} "
            f"{outcome} {elapsed:8.2f} ms")

    say("[6/7] rotation: AddSecretVersion on Secret Manager -> " + ("Pub/Sub -> bridge -> invalidation"
                                                                  if pubsub else "reconciliation"))
    old = (await keychain.get(ref, execution_id=EXECUTIONS[0])).value
    rotated_at = time.perf_counter()
    secrets.add_secret_version(parent=secret_name, payload={"data": b"sk-rotated-" + os.urandom(6).hex().encode()})
    stale_reads, applied = 0, False
    while time.perf_counter() - rotated_at < 60:
        lookup = await keychain.get(ref, execution_id=EXECUTIONS[0])
        if lookup and lookup.value != old:
            break
        if not lookup:
            applied = True  # invalidated: from here on, the old value must never come back
        elif applied:
            stale_reads += 1
        await asyncio.sleep(0.005)
    lag_ms = (time.perf_counter() - rotated_at) * 1000
    for execution_id in EXECUTIONS:  # every running execution now reads the new version
        for _ in range(10):
            lookup = await keychain.get(ref, execution_id=execution_id)
            stale_reads += bool(lookup) and lookup.value == old
    say(f"      rows refreshed with the new version {lag_ms:.0f} ms after AddSecretVersion; "
        f"{stale_reads} reads of the old version after it was invalidated")
    regional_after = await keychain.get(regional_ref, execution_id=REGIONAL_EXECUTION)
    regional_kept = bool(regional) and bool(regional_after) and regional_after.value == regional.value
    say(f"      the regional secret's row {'was left alone' if regional_kept else 'WAS TOUCHED'} "
        f"(another secret of the same id)")
    refreshed = f"SELECT count(*) FROM {noetl_server.schema}.keychain WHERE expires_at > now() " \
                "AND execution_id = ANY($1::bigint[])"  # an invalidated row is expired until its new value is in
    await wait(lambda: _rows(keychain, refreshed, NOETL_EXECUTIONS), len(NOETL_EXECUTIONS))
    noetl_stale = 0
    for execution_id in NOETL_EXECUTIONS:  # and so does NoETL's server, from its own keychain
        answer = await noetl_server.get_credential("openai_token", execution_id)
        noetl_stale += answer.value["api_key"] == old
    say(f"      NoETL's server reads the new version for all {len(NOETL_EXECUTIONS)} of its executions "
        f"({noetl_stale} reads of the old one)")

    say("[7/7] two executions finish (purge); the third's finish event is lost, its rows expire (sweep)")
    count = "SELECT count(*) FROM keychain WHERE execution_id = ANY($1::bigint[])"
    rows_before = await keychain.pool.fetchval(count, EXECUTIONS)
    await produce(bootstrap, events_topic, records(*[finish_record(e, CATALOG_ID)
                                                     for e in (*EXECUTIONS[:2], REGIONAL_EXECUTION)]))
    await wait(lambda: _rows(keychain, count, EXECUTIONS[:2]), 0)
    purged = rows_before - await keychain.pool.fetchval(count, EXECUTIONS)
    await keychain.pool.execute("UPDATE keychain SET expires_at = now() WHERE execution_id = $1", EXECUTIONS[2])
    await wait(lambda: _rows(keychain, count, EXECUTIONS), 0)
    swept = rows_before - purged - await keychain.pool.fetchval(count, EXECUTIONS)
    rows_after = await keychain.pool.fetchval(count, EXECUTIONS)
    say(f"      rows of these executions: {rows_before} before, {purged} purged on finish, {swept} swept, "
        f"{rows_after} left")
    noetl_count = f"SELECT count(*) FROM {noetl_server.schema}.keychain WHERE execution_id = ANY($1::bigint[])"
    noetl_before = await keychain.pool.fetchval(noetl_count, NOETL_EXECUTIONS)
    await produce(bootstrap, events_topic, records(*[finish_record(e, NOETL_CATALOG_ID) for e in NOETL_EXECUTIONS[:2]]))
    await wait(lambda: _rows(keychain, noetl_count, NOETL_EXECUTIONS[:2]), 0)
    noetl_purged = noetl_before - await keychain.pool.fetchval(noetl_count, NOETL_EXECUTIONS)
    await keychain.pool.execute(f"UPDATE {noetl_server.schema}.keychain SET expires_at = now() - interval '1 s' "
                                "WHERE execution_id = $1", NOETL_EXECUTIONS[2])
    await wait(lambda: _rows(keychain, noetl_count, NOETL_EXECUTIONS), 0)
    say(f"      NoETL's keychain: {noetl_before} rows, {noetl_purged} purged on finish, "
        f"{noetl_before - noetl_purged} swept")
    dead = await consume(bootstrap, keychain.settings.dlq_topic, 1, timeout=2)
    say(f"      dead letters: {len(dead)} (NoETL's step records are ignored, not dead-lettered)")
    return {
        **figures,
        "dead_letters": len(dead),
        "first_use_hit_ratio": round(figures["first_use_hits"] / figures["first_use_reads"], 3),
        "regional_first_use_hit": bool(regional),
        "regional_kept_through_global_rotation": regional_kept,
        "hit_read_ms_p50": round(statistics.median(read_ms["hit"]), 3) if read_ms["hit"] else None,
        "miss_read_ms_p50": round(statistics.median(read_ms["miss"]), 3) if read_ms["miss"] else None,
        "sm_calls": server.access_count(),
        **noetl_figures,
        "noetl_server_sm_calls": noetl_server.provider_fetches,
        "noetl_stale_reads_after_rotation": noetl_stale,
        "noetl_rows_purged": noetl_purged,
        "noetl_rows_swept": noetl_before - noetl_purged,
        "stale_reads_after_rotation": stale_reads,
        "rotation_lag_ms": round(lag_ms, 1),
        "rotation_via": "pubsub" if pubsub else "reconciliation",
        "rows_before": rows_before,
        "purged_rows": purged,
        "swept_rows": swept,
        "rows_after": rows_after,
    }


async def _rows(keychain, query, executions) -> int:
    return await keychain.pool.fetchval(query, executions)


async def wait(measure, expected, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while await measure() != expected:
        if time.monotonic() > deadline:
            raise TimeoutError("the demo's worker did not catch up in time")
        await asyncio.sleep(0.05)


# Variables a shell may hold for other services (`source <(make -s stack)`, a real project): the demo runs on
# services of its own, in the test server's project, whatever the shell says.
NOT_INHERITED = ("KEYCHAIN_", "KAFKA_", "PUBSUB_", "SECRET_MANAGER_", "NOETL_", "GOOGLE_CLOUD_PROJECT", "GCP_PROJECT")


def main() -> None:
    stop_on_signals()  # SIGTERM at any moment: every service started so far is stopped
    inherited = sorted(name for name in os.environ if name.startswith(NOT_INHERITED))
    for name in inherited:
        del os.environ[name]
    if inherited:
        say(f"(the demo starts services of its own; not used from this shell: {', '.join(inherited)})")
    say("[1/7] starting PostgreSQL, the Kafka-protocol broker, the Pub/Sub emulator, the Secret Manager test server ...")
    started = time.perf_counter()
    os.environ.setdefault("KEYCHAIN_KEYS", KeyRing.generate_spec("demo1"))
    with LocalStack(secret_manager_delay_seconds=0.25) as stack:
        summary = asyncio.run(play(stack))
    summary["demo_seconds"] = round(time.perf_counter() - started, 1)
    say(json.dumps(summary))

"""bench/warm's noetl target part: a burst of NoETL's own start records (written to NoETL's event table and sent
on Kafka) for a `kind: secrets` playbook, the worker warming NoETL's own keychain (KEYCHAIN_TARGET=noetl), and each
execution's first use read the way NoETL's server reads it (devtools/noetl_server.py) FIRST_READ_AFTER_S after its
event. Against NoETL alone, measured in the same run: the same reads with no warmer, where NoETL's server fetches
every alias field of every execution itself.

Figures: `noetl_first_read_hit_ratio` (warmed; NoETL alone: 0), `noetl_sm_calls_per_execution` and
`noetl_alone_sm_calls_per_execution` (one per alias field), their ratio, `noetl_ready_p50_ms` / `_p99_ms`.
"""

from __future__ import annotations

import asyncio
import base64
import os
import time

import asyncpg
from aiokafka import AIOKafkaProducer

from devtools.local import WorkerProcess, create_topics, finish_event, local_worker_env
from devtools.noetl_samples import as_message, rust_playbook_started
from devtools.noetl_schema import create_noetl_tables, record_event, register_playbook
from devtools.noetl_server import NoetlServerReads
from devtools.stack import LocalStack
from keychain import Keychain

from .common import ms, percentile, settings_for

CATALOG_ID = 43
ALIASES = {"openai_token": ("api_key", "org_id"), "pg_password": (None,)}  # 3 Secret Manager values per execution
PLAYBOOK = """\
apiVersion: noetl.io/v2
kind: Playbook
metadata: {name: bench_noetl, path: bench/noetl}
keychain:
  - name: openai_token
    kind: secrets
    provider: gcp
    map:
      api_key: '{{ openai_key }}'
      org_id: '{{ openai_org }}'
  - name: pg_password
    kind: secrets
    provider: gcp
workflow:
  - step: start
    tool: {kind: http, url: 'https://api.example.com', headers: {Authorization: 'Bearer {{ keychain.openai_token.api_key }}'}}
"""


async def noetl_burst(stack: LocalStack, quick: bool, first_read_after_s: float) -> dict:
    executions = 100 if quick else 500
    alone = 10 if quick else 30
    server, bootstrap = stack.secret_manager, stack.env["KAFKA_BOOTSTRAP_SERVERS"]
    for secret_id in ("bench-noetl-key", "bench-noetl-org", "pg_password"):
        server.create_secret(secret_id)
        server.add_version(secret_id, f"value-of-{secret_id}-" + "x" * 32)
    workload = {"openai_key": "projects/test-project/secrets/bench-noetl-key",
                "openai_org": "projects/test-project/secrets/bench-noetl-org"}
    noetl_key = base64.b64encode(os.urandom(32)).decode()
    settings = settings_for(stack, "bench_noetl_kw", events_topic="bench-noetl", dlq_topic="bench-noetl-dlq",
                            rotations_topic="bench-noetl-rotations")
    await create_topics(bootstrap, settings.events_topic, settings.dlq_topic, settings.rotations_topic, partitions=8)
    env = local_worker_env({**os.environ, **stack.env}, "bench-noetl", KEYCHAIN_SCHEMA=settings.schema_name,
                           KEYCHAIN_TOPIC_PARTITIONS="8", KEYCHAIN_EVENTS_TOPIC=settings.events_topic,
                           KEYCHAIN_DLQ_TOPIC=settings.dlq_topic, KEYCHAIN_ROTATIONS_TOPIC=settings.rotations_topic,
                           KEYCHAIN_TARGET="noetl", KEYCHAIN_CATALOG_SCHEMA="bench_noetl", NOETL_ENCRYPTION_KEY=noetl_key,
                           GOOGLE_CLOUD_PROJECT="test-project")
    pool = await asyncpg.create_pool(stack.env["KEYCHAIN_DSN"], min_size=8, max_size=8)
    try:
        async with pool.acquire() as conn:
            await create_noetl_tables(conn, "bench_noetl")
            await register_playbook(conn, "bench_noetl", CATALOG_ID, "bench/noetl", PLAYBOOK)
        reads = NoetlServerReads(pool, "bench_noetl", encryption_key=noetl_key,
                                 secret_manager_endpoint=stack.env["SECRET_MANAGER_ENDPOINT"], project="test-project")

        async def first_uses(first_id: int, count: int, sent_at: dict[int, float]) -> list[bool]:
            async def first_use(execution_id: int) -> bool:
                await asyncio.sleep(max(0.0, sent_at[execution_id] + first_read_after_s - time.time()))
                answers = [await reads.get_credential(alias, execution_id) for alias in ALIASES]
                return all(a.source == "keychain" for a in answers)

            return list(await asyncio.gather(*(first_use(first_id + n) for n in range(count))))

        # NoETL alone: its start records, no warmer: every first use is its server's own Secret Manager calls
        calls_before, sent_at = server.access_count(), {}
        for n in range(alone):
            await record_event(pool, "bench_noetl", rust_playbook_started(90_000_000 + n, CATALOG_ID, "bench/noetl",
                                                                          workload))
            sent_at[90_000_000 + n] = time.time() - first_read_after_s
        alone_hits = await first_uses(90_000_000, alone, sent_at)
        alone_calls = (server.access_count() - calls_before) / alone

        async with Keychain(settings) as kc:
            await kc.migrate()
            worker = WorkerProcess(env).start()
            try:
                producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
                await producer.start()
                await producer.send_and_wait(settings.events_topic, finish_event(1)[1], key=finish_event(1)[0])
                while not await kc.pool.fetchval("SELECT count(*) FROM keychain_finished_execution "
                                                 "WHERE execution_id = 1"):
                    await asyncio.sleep(0.05)
                calls_before, sent_at, first_id = server.access_count(), {}, 91_000_000
                for n in range(executions):
                    row = rust_playbook_started(first_id + n, CATALOG_ID, "bench/noetl", workload)
                    await record_event(pool, "bench_noetl", row)
                    key, value = as_message(row)
                    await producer.send(settings.events_topic, value, key=key)
                    sent_at[first_id + n] = time.time()
                await producer.flush()
                await producer.stop()
                hits = await first_uses(first_id, executions, sent_at)
                calls = (server.access_count() - calls_before) / executions
                ready = dict(await pool.fetch(
                    "SELECT execution_id, extract(epoch FROM max(created_at))::float8 FROM bench_noetl.keychain "
                    "WHERE execution_id BETWEEN $1 AND $2 GROUP BY 1", first_id, first_id + executions - 1))
            finally:
                worker.stop()
    finally:
        await pool.close()
    latencies = [moment - sent_at[e] for e, moment in ready.items()]
    return {
        "noetl_executions": executions,
        "noetl_first_read_after_ms": first_read_after_s * 1000,
        "noetl_first_read_hit_ratio": round(sum(hits) / len(hits), 4),
        "noetl_alone_first_read_hit_ratio": round(sum(alone_hits) / len(alone_hits), 4),
        "noetl_sm_calls_per_execution": round(calls, 4),
        "noetl_alone_sm_calls_per_execution": round(alone_calls, 4),
        "noetl_sm_calls_vs_alone": round(calls / alone_calls, 4),
        "noetl_ready_p50_ms": ms(percentile(latencies, 50)),
        "noetl_ready_p99_ms": ms(percentile(latencies, 99)),
    }

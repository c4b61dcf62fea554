"""bench/warm's consumer part: what the worker pays per record it reads and ignores, beside the floor of a plain
aiokafka consumer on the same records in the same run, and what an idle worker costs.

- `ignored_*`: a burst of what NoETL writes between an execution's start and finish (a dozen record types per step,
  which the warmer reads and ignores): the worker's own cost per record when a record needs no work at all (fetching
  it, parsing it, committing its offset).
- `aiokafka_floor_ms_per_record`: bench/aiokafka_floor.py on the same number of the same records (getmany in
  batches, json.loads of every value, a count by event_type, a commit per batch), its CPU read as the worker's is;
  `ignored_vs_aiokafka_floor` the ratio.
- `idle_worker_cpu_s_per_s`: a worker that receives nothing, at the production fetch wait
  (KEYCHAIN_CONSUMER_FETCH_MAX_WAIT_MS default), and `idle_worker_cpu_s_per_s_at_20ms` at the local broker's (tansu
  holds a fetch for its whole wait, so the local stack asks for 20 ms; Apache Kafka answers at once).
"""

from __future__ import annotations

import asyncio
import time

from aiokafka import AIOKafkaProducer

from devtools.local import create_topics
from devtools.noetl_samples import as_message, finish_record, step_records
from devtools.stack import LocalStack
from keychain import Keychain
from streams.settings import WorkerSettings

from .aiokafka_floor import floor_result, start_floor_consumer
from .common import consuming_worker, own_worker, worker_cpu_seconds

CATALOG_ID = 42
STEPS = ("extract", "transform", "load", "notify")


async def consumer_cost(stack: LocalStack, quick: bool) -> dict:
    executions = 40 if quick else 400  # x 12 record types x 4 steps
    settings, env = await own_worker(stack, "bench-warm-ignored")
    bootstrap = stack.env["KAFKA_BOOTSTRAP_SERVERS"]
    first_id = 50_000_000
    records = [as_message(row) for n in range(executions) for step in STEPS
               for row in step_records(first_id + n, CATALOG_ID, step)]
    async with Keychain(settings) as kc:
        await kc.migrate()
        async with consuming_worker(kc, bootstrap, settings, env) as worker:
            producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
            await producer.start()
            last_on_partition: dict[int, int] = {}
            try:
                cpu_before, started = worker_cpu_seconds(worker.pid), time.time()
                sending = [(int(key), await producer.send(settings.events_topic, value, key=key))
                           for key, value in records]
                for execution_id, sent in sending:
                    last_on_partition[(await sent).partition] = execution_id
                # Each partition's last execution finishes after its records: when all those are fenced, all is read.
                for execution_id in last_on_partition.values():
                    key, value = as_message(finish_record(execution_id, CATALOG_ID))
                    await producer.send(settings.events_topic, value, key=key)
                await producer.flush()
            finally:
                await producer.stop()
            while await kc.pool.fetchval("SELECT count(*) FROM keychain_finished_execution WHERE execution_id = ANY($1)",
                                         list(last_on_partition.values())) < len(last_on_partition):
                await asyncio.sleep(0.02)
            span, cpu = time.time() - started, worker_cpu_seconds(worker.pid) - cpu_before
    events = len(sending) + len(last_on_partition)
    floor = await aiokafka_floor(bootstrap, records)
    idle = {"idle_worker_cpu_s_per_s": await idle_cost(stack, quick, WorkerSettings().consumer_fetch_max_wait_ms),
            "idle_worker_cpu_s_per_s_at_20ms": await idle_cost(stack, quick, 20)}
    ignored = round(cpu / events * 1000, 4)
    return {
        "ignored_events": events,
        "ignored_events_per_s": round(events / span, 1),
        "ignored_worker_cpu_ms_per_event": ignored,
        "aiokafka_floor_ms_per_record": round(floor, 4),
        "ignored_vs_aiokafka_floor": round(ignored / floor, 2),
        **idle,
    }


async def aiokafka_floor(bootstrap: str, records: list[tuple[bytes, bytes]]) -> float:
    """The plain consumer's CPU per record (ms), on its own copy of the records, produced while it waits for them."""
    await create_topics(bootstrap, "bench-aiokafka-floor", partitions=8)
    consumer = start_floor_consumer(bootstrap, "bench-aiokafka-floor", "bench-aiokafka-floor", len(records))
    await asyncio.sleep(4)  # it joins its group (tansu admits a member after about half the session timeout)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        for key, value in records:
            await producer.send("bench-aiokafka-floor", value, key=key)
        await producer.flush()
    finally:
        await producer.stop()
    result = await asyncio.to_thread(floor_result, consumer)
    return result["cpu_seconds"] / result["records"] * 1000


async def idle_cost(stack: LocalStack, quick: bool, fetch_wait_ms: int) -> float:
    """CPU seconds per second of a worker that receives nothing (after it settled)."""
    settings, env = await own_worker(stack, f"bench-warm-idle-{fetch_wait_ms}")
    env["KEYCHAIN_CONSUMER_FETCH_MAX_WAIT_MS"] = str(fetch_wait_ms)
    async with Keychain(settings) as kc:
        await kc.migrate()
        async with consuming_worker(kc, stack.env["KAFKA_BOOTSTRAP_SERVERS"], settings, env) as worker:
            await asyncio.sleep(2)
            seconds = 5 if quick else 15
            before = worker_cpu_seconds(worker.pid)
            await asyncio.sleep(seconds)
            return round((worker_cpu_seconds(worker.pid) - before) / seconds, 4)

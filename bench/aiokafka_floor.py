"""The floor under the worker's cost per ignored record: a plain aiokafka consumer that does only what any consumer of
NoETL's event stream must (fetch in batches with `getmany`, `json.loads` every value, count it by `event_type`,
commit once per batch), in a process of its own so that its CPU is read as the worker's is (from /proc, psutil).

`python -m bench.aiokafka_floor TOPIC GROUP RECORDS` consumes RECORDS records and prints, as its last line,
{"records": N, "cpu_seconds": S, "wall_seconds": W} counted from its first record to its last; bench/warm runs it
beside the worker on the same records.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections import Counter

from aiokafka import AIOKafkaConsumer


async def consume(bootstrap: str, topic: str, group: str, expected: int) -> dict:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
                                auto_offset_reset="earliest", fetch_max_wait_ms=20, max_poll_records=500,
                                session_timeout_ms=6000, heartbeat_interval_ms=1000)
    await consumer.start()
    counts: Counter[str] = Counter()
    seen, cpu_start, wall_start = 0, None, None
    try:
        while seen < expected:
            batches = await consumer.getmany(timeout_ms=200, max_records=500)
            for records in batches.values():
                if cpu_start is None and records:
                    cpu_start, wall_start = time.process_time(), time.perf_counter()
                for record in records:
                    counts[json.loads(record.value).get("event_type")] += 1
                    seen += 1
            if batches:
                await consumer.commit()
    finally:
        await consumer.stop()
    return {"records": seen, "cpu_seconds": time.process_time() - cpu_start,
            "wall_seconds": time.perf_counter() - wall_start, "types": len(counts)}


def start_floor_consumer(bootstrap: str, topic: str, group: str, records: int) -> subprocess.Popen:
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": bootstrap}
    return subprocess.Popen([sys.executable, "-m", "bench.aiokafka_floor", topic, group, str(records)], env=env,
                            stdout=subprocess.PIPE, text=True)


def floor_result(process: subprocess.Popen, timeout: float = 300) -> dict:
    out, _ = process.communicate(timeout=timeout)
    return json.loads(out.strip().splitlines()[-1])


if __name__ == "__main__":
    topic, group, records = sys.argv[1], sys.argv[2], int(sys.argv[3])
    print(json.dumps(asyncio.run(consume(os.environ["KAFKA_BOOTSTRAP_SERVERS"], topic, group, records))), flush=True)

"""Replicas: the same burst of start events (3 secrets each out of 10, 8 partitions) through 1, 2 and 3 workers on
one consumer group, then the takeover after one of two workers is SIGKILLed.

Reports the Secret Manager calls of each burst (`sm_calls_N`: one per secret however many replicas, the shared
fetches), events/s with 1, 2 and 3 workers beside the share of the machine's cores busy meanwhile (`machine_busy_N`:
near 1, there is no core left for another replica to use), and `takeover_s`: from the SIGKILL of one of two workers
to every event of a burst sent right after it warmed (so including the killed worker's partitions, after the session
timeout: 3 s here, as in the tests). The baseline in the same run is the single worker. The burst is sent at the
broker's pace (no round trip per message), so that the workers, not the sender, set events/s.

    python -m bench.replicas [--quick]
"""

from __future__ import annotations

import asyncio
import os
import time

import psutil

from devtools.local import WorkerProcess, create_topics, local_worker_env, start_event
from devtools.stack import LocalStack
from keychain import Keychain, SecretManagerSource

from .common import arguments, report, send_burst, settings_for

SECRETS = 10
PARTITIONS = 8


def burst(first: int, count: int) -> list[tuple[bytes, bytes]]:
    return [start_event(first + i, [f"projects/test-project/secrets/rep-{(i * 3 + k) % SECRETS}/versions/latest"
                                    for k in range(3)]) for i in range(count)]


async def rows_reach(kc: Keychain, expected: int, timeout: float = 300) -> float:
    deadline = time.monotonic() + timeout
    while (await kc.pool.fetchval("SELECT count(*) FROM keychain")) < expected:
        if time.monotonic() > deadline:
            raise TimeoutError(f"fewer than {expected} rows in time")
        await asyncio.sleep(0.02)
    return time.monotonic()


def machine_busy_share(before, after) -> float:
    """The share of all this machine's cores that was busy between two readings (workers, PostgreSQL, the broker and
    this process together): near 1, replicas have no core left to add throughput on."""
    idle = (after.idle - before.idle) + (getattr(after, "iowait", 0) - getattr(before, "iowait", 0))
    busy = sum(after) - sum(before) - idle
    return round(busy / (sum(after) - sum(before)), 3)


async def run_replicas(stack: LocalStack, replicas: int, events: int, takeover: bool = False) -> dict:
    name = f"bench-replicas-{replicas}{'-takeover' if takeover else ''}"
    settings = settings_for(stack, name.replace("-", "_"), events_topic=name, dlq_topic=f"{name}-dlq")
    bootstrap = stack.env["KAFKA_BOOTSTRAP_SERVERS"]
    await create_topics(bootstrap, settings.events_topic, settings.dlq_topic, partitions=PARTITIONS)
    server = stack.secret_manager
    async with Keychain(settings, source=SecretManagerSource(settings)) as kc:
        await kc.migrate()
        env = {**os.environ, **stack.env, "KEYCHAIN_SCHEMA": settings.schema_name,
               "KEYCHAIN_EVENTS_TOPIC": settings.events_topic, "KEYCHAIN_DLQ_TOPIC": settings.dlq_topic,
               "KEYCHAIN_TOPIC_PARTITIONS": str(PARTITIONS)}
        workers = [WorkerProcess(local_worker_env(env, name)).start() for _ in range(replicas)]
        try:
            calls_before = server.access_count()
            cpu_before = psutil.cpu_times()
            started = time.monotonic()
            await send_burst(bootstrap, settings.events_topic, burst(10_000_000, events))
            done = await rows_reach(kc, events * 3)
            figures = {"sm_calls": server.access_count() - calls_before,
                       "events_per_s": round(events / (done - started), 1),
                       "machine_busy": machine_busy_share(cpu_before, psutil.cpu_times())}
            if takeover:
                workers[-1].kill()
                killed = time.monotonic()
                await send_burst(bootstrap, settings.events_topic, burst(20_000_000, 64))
                figures["takeover_s"] = round(await rows_reach(kc, events * 3 + 64 * 3) - killed, 2)
            return figures
        finally:
            for worker in workers:  # one at a time: the local broker wedges a group when two leave at once
                worker.stop()


async def run(stack: LocalStack, quick: bool) -> dict:
    events = 300 if quick else 6000
    server = stack.secret_manager
    for i in range(SECRETS):
        server.create_secret(f"rep-{i}")
        server.add_version(f"rep-{i}", f"value-{i}-" + "x" * 40)
    results = {n: await run_replicas(stack, n, events) for n in (1, 2, 3)}
    takeover = await run_replicas(stack, 2, 100, takeover=True)
    return {
        "events": events,
        "sm_calls_1": results[1]["sm_calls"], "sm_calls_2": results[2]["sm_calls"],
        "sm_calls_3": results[3]["sm_calls"],
        "events_per_s_1": results[1]["events_per_s"], "events_per_s_2": results[2]["events_per_s"],
        "events_per_s_3": results[3]["events_per_s"],
        "machine_busy_1": results[1]["machine_busy"], "machine_busy_2": results[2]["machine_busy"],
        "machine_busy_3": results[3]["machine_busy"], "cores": psutil.cpu_count(),
        "takeover_s": takeover["takeover_s"],
    }


def main() -> None:
    args = arguments(__doc__.splitlines()[0])
    with LocalStack(secret_manager_delay_seconds=args.sm_delay_ms / 1000, pubsub=False) as stack:
        report(asyncio.run(run(stack, args.quick)))


if __name__ == "__main__":
    main()

"""Rotation lag: Secret Manager notification published -> the old value no longer served, over many rotations,
next to the Pub/Sub emulator's own publish -> delivery latency measured on the same notifications.

    python -m bench.invalidate [--quick]
"""

from __future__ import annotations

import asyncio
import os
import time

from keychain import Keychain
from devtools.stack import LocalStack, pubsub_unavailable_reason
from devtools.local import WorkerProcess, create_topics, finish_event, local_worker_env, produce, start_event

from .common import arguments, ms, percentile, report, settings_for

EXECUTIONS = 5


async def run(stack: LocalStack, quick: bool) -> dict:
    from google.cloud import pubsub_v1

    rotations = 10 if quick else 50
    settings = settings_for(stack, "bench_invalidate")
    project = stack.env["GOOGLE_CLOUD_PROJECT"]
    publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
    topic = publisher.create_topic(name=f"projects/{project}/topics/bench-rotations").name
    worker_subscription = subscriber.create_subscription(
        name=f"projects/{project}/subscriptions/bench-warmer", topic=topic, ack_deadline_seconds=10).name
    probe_subscription = subscriber.create_subscription(
        name=f"projects/{project}/subscriptions/bench-probe", topic=topic, ack_deadline_seconds=10).name
    server = stack.secret_manager
    server.create_secret("rotating", topics=[topic])
    server.add_version("rotating", "value-0")
    ref = "projects/test-project/secrets/rotating/versions/latest"

    delivered: dict[str, float] = {}  # versionId -> when the emulator delivered it to a plain subscriber

    def on_probe(message) -> None:
        delivered[message.attributes.get("versionId", "")] = time.perf_counter()
        message.ack()

    probe = subscriber.subscribe(probe_subscription, callback=on_probe)
    bootstrap = stack.env["KAFKA_BOOTSTRAP_SERVERS"]
    await create_topics(bootstrap, settings.events_topic, settings.dlq_topic, settings.rotations_topic)
    env = local_worker_env({**os.environ, **stack.env}, "bench-inv", KEYCHAIN_SCHEMA=settings.schema_name,
                           KEYCHAIN_ROTATION_SUBSCRIPTION=worker_subscription, KEYCHAIN_RECONCILE_INTERVAL_SECONDS="3600")
    lags, pubsub = [], []
    async with Keychain(settings) as kc:
        await kc.migrate()
        worker = WorkerProcess(env).start()
        try:
            await produce(bootstrap, settings.events_topic, [finish_event(1)])
            await produce(bootstrap, settings.events_topic, [start_event(100 + e, [ref]) for e in range(EXECUTIONS)])
            while await kc.pool.fetchval("SELECT count(*) FROM keychain WHERE state = 'ready'") < EXECUTIONS:
                await asyncio.sleep(0.05)
            await asyncio.sleep(2)  # let the notifications of the set-up pass
            for n in range(1, rotations + 1):
                old = f"value-{n - 1}"
                while (await kc.get(ref, execution_id=100)).value != old:  # the previous refresh has landed
                    await asyncio.sleep(0.01)
                published = time.perf_counter()
                version = await asyncio.to_thread(server.add_version, "rotating", f"value-{n}")
                while True:  # until the old value is no longer served
                    lookup = await kc.get(ref, execution_id=100)
                    if not lookup or lookup.value != old:
                        break
                    await asyncio.sleep(0.002)
                lags.append(time.perf_counter() - published)
                deadline = time.perf_counter() + 10
                while version not in delivered and time.perf_counter() < deadline:
                    await asyncio.sleep(0.002)
                if version in delivered:
                    pubsub.append(delivered[version] - published)
        finally:
            worker.stop()
            probe.cancel()
    return {
        "rotations": rotations,
        "lag_p50_ms": ms(percentile(lags, 50)),
        "lag_p99_ms": ms(percentile(lags, 99)),
        "pubsub_p50_ms": ms(percentile(pubsub, 50)),
        "pubsub_p99_ms": ms(percentile(pubsub, 99)),
        "lag_minus_pubsub_p50_ms": ms(percentile(lags, 50) - percentile(pubsub, 50)),
        "lag_minus_pubsub_p99_ms": ms(percentile(lags, 99) - percentile(pubsub, 99)),
    }


def main() -> None:
    args = arguments(__doc__.splitlines()[0])
    reason = pubsub_unavailable_reason()
    if reason:
        report({"skipped": reason})
        return
    with LocalStack(secret_manager_delay_seconds=args.sm_delay_ms / 1000) as stack:
        report(asyncio.run(run(stack, args.quick)))


if __name__ == "__main__":
    main()

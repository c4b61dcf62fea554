"""Small operator commands for local stacks (docker compose): set up Pub/Sub, produce sample events."""

from __future__ import annotations

import asyncio
import json
import logging
import time


from streams.settings import WorkerSettings

from .local import finish_event, produce

log = logging.getLogger(__name__)


def pubsub_init(settings: WorkerSettings, topic: str) -> None:
    """Create the notification topic and the rotation subscription if they do not exist (idempotent)."""
    from google.api_core.exceptions import AlreadyExists
    from google.cloud import pubsub_v1

    from streams.bridge import subscription_path

    project = settings.google_cloud_project
    topic_path = topic if topic.startswith("projects/") else f"projects/{project}/topics/{topic}"
    try:
        pubsub_v1.PublisherClient().create_topic(name=topic_path)
    except AlreadyExists:
        pass
    subscription = subscription_path(settings)
    try:
        pubsub_v1.SubscriberClient().create_subscription(name=subscription, topic=topic_path, ack_deadline_seconds=10)
    except AlreadyExists:
        pass
    print(f"topic {topic_path} -> subscription {subscription}", flush=True)


def produce_samples(settings: WorkerSettings, ref: str, executions: int, interval: float) -> None:
    """Start `executions` executions reading `ref`, then finish them, every `interval` seconds."""

    async def run() -> None:
        first = int(time.time() * 1000) << 10
        while True:
            ids = [first + i for i in range(executions)]
            starts = [
                (str(e).encode(), json.dumps({
                    "event_type": "execution.started", "execution_id": e,
                    "credentials": [{"ref": ref}]}).encode())
                for e in ids
            ]
            await produce(settings.kafka_bootstrap_servers, settings.events_topic, starts)
            print(f"started {len(ids)} executions", flush=True)
            await asyncio.sleep(interval)
            await produce(settings.kafka_bootstrap_servers, settings.events_topic, [finish_event(e) for e in ids])
            print(f"finished {len(ids)} executions", flush=True)
            first += executions
            await asyncio.sleep(interval)

    asyncio.run(run())

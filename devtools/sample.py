"""Small commands for local stacks (`make stack`, docker compose): set up Pub/Sub, add a secret to the Secret Manager
test server, produce execution events."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time


from streams.settings import WorkerSettings

from .local import finish_event, produce, start_event

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


def add_secret(endpoint: str, project: str, secret_id: str, value: str, location: str | None) -> str:
    """A new version of `secret_id` (created first when missing) on the Secret Manager test server, through the
    official client; returns the version's name."""
    import grpc
    from google.api_core.exceptions import AlreadyExists
    from google.cloud.secretmanager_v1 import SecretManagerServiceClient
    from google.cloud.secretmanager_v1.services.secret_manager_service.transports import (
        SecretManagerServiceGrpcTransport,
    )

    channel = grpc.insecure_channel(endpoint)
    try:
        client = SecretManagerServiceClient(transport=SecretManagerServiceGrpcTransport(channel=channel))
        parent = f"projects/{project}" + (f"/locations/{location}" if location else "")
        try:
            client.create_secret(parent=parent, secret_id=secret_id, secret={})
        except AlreadyExists:
            pass
        where = f"/locations/{location}" if location else ""
        return client.add_secret_version(parent=f"projects/{project}{where}/secrets/{secret_id}",
                                         payload={"data": value.encode()}).name
    finally:
        channel.close()


def start_execution(settings: WorkerSettings, execution_id: int, refs: list[str]) -> None:
    """One execution-start event (our contract: `credentials`, each read under its reference's name). References are
    checked before anything is produced: a bad one is one line on stderr and exit 2, and no event."""
    from keychain.errors import InvalidReference
    from keychain.refs import SecretRef

    try:
        parsed = [SecretRef.parse(ref) for ref in refs]
    except InvalidReference as exc:
        print(f"error: {exc}; no event was produced", file=sys.stderr)
        sys.exit(2)
    asyncio.run(produce(settings.kafka_bootstrap_servers, settings.events_topic, [start_event(execution_id, refs)]))
    for ref in parsed:  # the name each is warmed under: the reference in full
        print(f"execution {execution_id}: {ref}")

"""Rotation end to end: the test server publishes real notifications to the Pub/Sub emulator, the worker's bridge
forwards them through the broker, the invalidation agent applies them."""

import asyncio
import json
import time

import grpc
import pytest
from google.cloud import pubsub_v1
from google.cloud.secretmanager_v1 import SecretManagerServiceClient
from google.cloud.secretmanager_v1.services.secret_manager_service.transports import SecretManagerServiceGrpcTransport

from keychain import CachedFailure
from keychain.refs import SecretIdentity

from .streams_harness import Worker, consume, create_topics, produce, start_event, wait_for, worker_env

pytestmark = pytest.mark.pubsub  # needs the Pub/Sub emulator: skipped without it here, a failure in CI


@pytest.fixture
def rotation(stack, settings, key_spec, unique, sm):
    project = stack.env["GOOGLE_CLOUD_PROJECT"]
    publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
    topic = publisher.create_topic(name=f"projects/{project}/topics/sm-{unique}").name
    subscription = subscriber.create_subscription(
        name=f"projects/{project}/subscriptions/kw-{unique}", topic=topic, ack_deadline_seconds=10).name
    channel = grpc.insecure_channel(sm.address)
    client = SecretManagerServiceClient(transport=SecretManagerServiceGrpcTransport(channel=channel))

    class Rotation:
        bootstrap = stack.env["KAFKA_BOOTSTRAP_SERVERS"]
        events, dlq, rotations = f"events-{unique}", f"dlq-{unique}", f"rot-{unique}"
        env = worker_env(stack, settings, key_spec, unique, KEYCHAIN_ROTATION_SUBSCRIPTION=subscription,
                         KEYCHAIN_ROTATIONS_TOPIC=f"rot-{unique}", PUBSUB_EMULATOR_HOST=stack.env["PUBSUB_EMULATOR_HOST"],
                         GOOGLE_CLOUD_PROJECT=project)
        worker: Worker | None = None

        def __init__(self):
            self.topic, self.subscription, self.client, self.publisher = topic, subscription, client, publisher

        def secret(self, secret_id, value):
            created = client.create_secret(parent=f"projects/{project}", secret_id=secret_id,
                                           secret={"topics": [{"name": topic}]})
            client.add_secret_version(parent=created.name, payload={"data": value.encode()})
            return created.name

    helper = Rotation()
    yield helper
    if helper.worker is not None:
        helper.worker.stop()
    channel.close()
    subscriber.delete_subscription(subscription=subscription)
    publisher.delete_topic(topic=topic)


async def test_rotation_refreshes_latest_keeps_pinned_and_disable_stops_serving(rotation, keychain, unique, execution_id):
    await create_topics(rotation.bootstrap, rotation.events, rotation.dlq, rotation.rotations)
    name = rotation.secret(f"rot-{unique}", "value-1")
    latest, pinned = f"{name}/versions/latest", f"{name}/versions/1"
    rotation.worker = Worker(rotation.env).start()
    await produce(rotation.bootstrap, rotation.events, [start_event(execution_id, [latest, pinned])])

    async def value_of(ref):
        lookup = await keychain.get(ref, execution_id=execution_id)
        return lookup.value

    await wait_for(lambda: _is(value_of(latest), "value-1"), what="warm")
    version = rotation.client.add_secret_version(parent=name, payload={"data": b"value-2"})
    started = time.monotonic()
    await wait_for(lambda: _is(value_of(latest), "value-2"), what="refresh after AddSecretVersion")
    assert time.monotonic() - started < 20
    assert await value_of(pinned) == "value-1"

    rotation.client.disable_secret_version(name=version.name)

    async def latest_refused():
        try:
            await keychain.get(latest, execution_id=execution_id)
        except CachedFailure:
            return True
        return False

    await wait_for(latest_refused, what="disabled version no longer served")
    assert await value_of(pinned) == "value-1"

    # A malformed notification: dead-lettered with its reason, acknowledged, the bridge goes on.
    rotation.publisher.publish(rotation.topic, b"{}", eventType="SECRET_VERSION_ADD", secretId="not a secret").result()
    dead = await consume(rotation.bootstrap, rotation.dlq, 1)
    assert dict(dead[0].headers)["reason"] == b"invalid_notice"
    assert json.loads(dict(dead[0].headers)["attributes"])["secretId"] == "not a secret"


async def _is(coroutine, expected):
    return await coroutine == expected


async def test_bridge_killed_between_produce_and_ack_loses_and_doubles_nothing(rotation, keychain, unique):
    await create_topics(rotation.bootstrap, rotation.events, rotation.dlq, rotation.rotations)
    secret_id = f"kill-{unique}"
    name = rotation.secret(secret_id, "value-1")
    rotation.worker = Worker(rotation.env).start()
    notices = 20 + 1  # and the AddSecretVersion that created version 1

    async def generation():
        identity = SecretIdentity("1014428265962", secret_id)
        return (await keychain.maintenance.generations([identity]))[identity]

    for i in range(notices - 1):
        rotation.publisher.publish(
            rotation.topic, json.dumps({"name": f"{name}/versions/1"}).encode(), eventType="SECRET_VERSION_ADD",
            secretId=name, versionId=f"{name}/versions/1", dataFormat="JSON_API_V1",
        ).result()
        if i in (6, 13):
            rotation.worker.kill()  # anywhere: mid-produce, between produce and ack, ...
            rotation.worker.start()
    try:  # a killed bridge costs at most one lease (10 s) per notice it held: no notice waits several leases
        await wait_for(lambda: _is(generation(), notices), timeout=45, what="every notice applied")
    except AssertionError:
        raise AssertionError(f"generation {await generation()} != {notices}:\n{rotation.worker.output[-4000:]}")
    await asyncio.sleep(3)  # redeliveries still in flight must not apply again
    assert await generation() == notices

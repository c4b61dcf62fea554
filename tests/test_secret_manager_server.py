"""The test server through the official client: names, states, faults, and the notifications it publishes."""

import json
import time

import grpc
import pytest
from google.api_core import exceptions as gexc
from google.cloud import pubsub_v1
from google.cloud.secretmanager_v1 import SecretManagerServiceClient
from google.cloud.secretmanager_v1.services.secret_manager_service.transports import SecretManagerServiceGrpcTransport



@pytest.fixture
def client(sm):
    channel = grpc.insecure_channel(sm.address)
    yield SecretManagerServiceClient(transport=SecretManagerServiceGrpcTransport(channel=channel))
    channel.close()


def test_versions_states_and_names(client, sm, unique):
    secret = client.create_secret(parent="projects/test-project", secret_id=f"x-{unique}", secret={})
    assert secret.name == f"projects/1014428265962/secrets/x-{unique}"  # the service names projects by number
    v1 = client.add_secret_version(parent=secret.name, payload={"data": b"one"})
    v2 = client.add_secret_version(parent=f"projects/test-project/secrets/x-{unique}", payload={"data": b"two"})
    assert v2.name.endswith("/versions/2")
    latest = client.access_secret_version(name=f"projects/test-project/secrets/x-{unique}/versions/latest")
    assert latest.name == v2.name and latest.payload.data == b"two"
    client.disable_secret_version(name=v1.name)
    with pytest.raises(gexc.FailedPrecondition):
        client.access_secret_version(name=v1.name, retry=None)
    client.disable_secret_version(name=v2.name)
    with pytest.raises(gexc.FailedPrecondition):  # latest is the newest version, even when disabled
        client.access_secret_version(name=f"{secret.name}/versions/latest", retry=None)
    with pytest.raises(gexc.NotFound):
        client.access_secret_version(name=f"{secret.name}/versions/9", retry=None)
    with pytest.raises(gexc.PermissionDenied):
        client.access_secret_version(name=f"projects/other/secrets/x-{unique}/versions/1", retry=None)
    versions = client.list_secret_versions(parent=secret.name)
    assert [v.state.name for v in versions] == ["DISABLED", "DISABLED"]


def test_fault_injection(client, sm, secret):
    secret_id, value = secret
    name = f"projects/test-project/secrets/{secret_id}/versions/1"
    sm.inject(grpc.StatusCode.PERMISSION_DENIED, times=1, secret=secret_id)
    with pytest.raises(gexc.PermissionDenied):
        client.access_secret_version(name=name, retry=None)
    assert client.access_secret_version(name=name, retry=None).payload.data == value.encode()
    sm.delay_seconds = 0.2
    started = time.monotonic()
    client.access_secret_version(name=name, retry=None)
    assert time.monotonic() - started >= 0.2


@pytest.mark.pubsub
def test_notifications_like_the_real_service(client, sm, stack, unique):
    project = stack.env["GOOGLE_CLOUD_PROJECT"]
    publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
    topic = publisher.create_topic(name=f"projects/{project}/topics/sm-{unique}").name
    subscription = subscriber.create_subscription(
        name=f"projects/{project}/subscriptions/sm-{unique}", topic=topic
    ).name
    secret = client.create_secret(parent=f"projects/{project}", secret_id=f"n-{unique}", secret={"topics": [{"name": topic}]})
    version = client.add_secret_version(parent=secret.name, payload={"data": b"v1"})
    client.disable_secret_version(name=version.name)
    client.enable_secret_version(name=version.name)
    client.destroy_secret_version(name=version.name)
    client.delete_secret(name=secret.name)

    expected = ["SECRET_CREATE", "SECRET_VERSION_ADD", "SECRET_VERSION_DISABLE", "SECRET_VERSION_ENABLE",
                "SECRET_VERSION_DESTROY", "SECRET_DELETE"]
    received = []
    deadline = time.monotonic() + 30
    while len(received) < len(expected) and time.monotonic() < deadline:
        response = subscriber.pull(subscription=subscription, max_messages=10, timeout=5)
        if response.received_messages:
            subscriber.acknowledge(subscription=subscription, ack_ids=[m.ack_id for m in response.received_messages])
        received += [m.message for m in response.received_messages]
    by_type = {m.attributes["eventType"]: m for m in received}
    assert sorted(by_type) == sorted(expected)
    for message in received:
        assert message.attributes["secretId"] == secret.name
        assert message.attributes["dataFormat"] == "JSON_API_V1"
        assert message.attributes["timestamp"]
    add = by_type["SECRET_VERSION_ADD"]
    assert add.attributes["versionId"] == version.name
    assert json.loads(add.data)["name"] == version.name and json.loads(add.data)["state"] == "ENABLED"
    assert "createTime" in json.loads(add.data)  # proto3 JSON: lowerCamelCase
    assert json.loads(by_type["SECRET_VERSION_DISABLE"].data)["state"] == "DISABLED"
    assert by_type["SECRET_DELETE"].attributes["deleteType"] == "REQUESTED"
    assert b"v1" not in b"".join(m.data for m in received)  # notifications never carry payloads
    subscriber.delete_subscription(subscription=subscription)
    publisher.delete_topic(topic=topic)

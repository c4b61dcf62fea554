"""Pub/Sub -> Kafka bridge for Secret Manager notifications.

The bridge long-polls the subscription (unary Pull, at most MAX_MESSAGES at a time, on the event
loop), forwards each notification to Kafka and acknowledges it only after Kafka acknowledged the produced notice
(handed back at once if producing failed, so Pub/Sub redelivers). Malformed messages go to the dead-letter topic, then
are acked. Errors are retried with backoff.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Awaitable, Callable

from google.api_core.exceptions import DeadlineExceeded
from google.pubsub_v1 import SubscriberAsyncClient


from .settings import WorkerSettings
from .events import BadEvent
from .notices import notice_from_pubsub

log = logging.getLogger(__name__)

MAX_MESSAGES = 100  # notifications held at once (flow control)
# The lease of each notification: what a crashed bridge held is redelivered after it (deploy/gcp/main.tf sets the same
# on the subscription).
ACK_DEADLINE_SECONDS = 10

PULL_WAIT_SECONDS = 30.0  # a long poll: a pull returns at once when a notification is there, else by this time

Publish = Callable[[bytes, bytes], Awaitable[None]]
DeadLetter = Callable[[bytes | None, bytes, str, str, dict[str, str]], Awaitable[bool]]


def subscription_path(settings: WorkerSettings) -> str:
    name = settings.rotation_subscription or ""
    if name.startswith("projects/"):
        return name
    if not settings.google_cloud_project:
        raise ValueError("KEYCHAIN_ROTATION_SUBSCRIPTION is a short name: set GOOGLE_CLOUD_PROJECT too")
    return f"projects/{settings.google_cloud_project}/subscriptions/{name}"


class RotationBridge:
    """Long-polling Pull (not StreamingPull), on the event loop with Google's asyncio client.

    Why not the streaming pull: when a bridge dies without closing its stream (SIGKILL, a node lost), the Pub/Sub
    emulator keeps delivering new notifications to the dead stream, round-robin with the live ones; each such
    notification comes back only after a lease, often to another dead stream: measured 10-50 s for notices published
    well after the crash, to a healthy bridge (reproduced with the plain client, none of our code). A Pull request
    holds nothing once answered: a dead bridge can only have taken what its last outstanding pull was given, and
    that comes back after one lease. A pull returns as soon as a notification is there, so latency stays low.
    """

    def __init__(self, settings: WorkerSettings, publish: Publish, dead_letter: DeadLetter):
        self.subscription = subscription_path(settings)
        self.settings = settings
        self.publish = publish
        self.dead_letter = dead_letter
        self.forwarded = 0
        self._client: SubscriberAsyncClient | None = None
        self._pulling = False
        self._stopping = False
        self._task: asyncio.Task | None = None

    @property
    def pulling(self) -> bool:
        return self._pulling and not self._stopping

    async def run(self) -> None:
        self._task = asyncio.current_task()
        self._client = SubscriberAsyncClient()  # PUBSUB_EMULATOR_HOST, when set, points it at the emulator
        log.info("rotation bridge pulling %s", self.subscription)
        backoff = 0.5
        while not self._stopping:
            try:
                self._pulling = True
                response = await self._client.pull(
                    subscription=self.subscription, max_messages=MAX_MESSAGES,
                    timeout=PULL_WAIT_SECONDS, retry=None,
                )
                backoff = 0.5
            except asyncio.CancelledError:
                break
            except DeadlineExceeded:  # a long poll that met no notification
                continue
            except Exception as exc:  # emulator or network gone, subscription missing, ...
                self._pulling = False
                if self._stopping:
                    break
                log.warning("rotation bridge pull failed (%s); again in %.1fs", type(exc).__name__, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30)
                continue
            if response.received_messages:
                await self._handle(response.received_messages)

    async def _handle(self, received) -> None:
        """Forward a pulled batch; ack what Kafka (or the DLQ) took, hand the rest back for redelivery at once."""
        ack_ids = [r.ack_id for r in received]
        lease = self._client.modify_ack_deadline(  # the lease a crashed bridge's notifications wait out
            subscription=self.subscription, ack_ids=ack_ids,
            ack_deadline_seconds=ACK_DEADLINE_SECONDS)
        outcomes = await asyncio.gather(lease, *(self._forward(r.message) for r in received), return_exceptions=True)
        done = [ack_id for ack_id, ok in zip(ack_ids, outcomes[1:]) if ok is True]
        again = [ack_id for ack_id, ok in zip(ack_ids, outcomes[1:]) if ok is not True]
        for outcome in outcomes[1:]:
            if isinstance(outcome, BaseException):
                log.error("rotation bridge: forwarding failed", exc_info=outcome)
        try:
            if done:
                await self._client.acknowledge(subscription=self.subscription, ack_ids=done)
            if again:
                await self._client.modify_ack_deadline(subscription=self.subscription, ack_ids=again,
                                                       ack_deadline_seconds=0)
        except Exception as exc:  # not acknowledged: redelivered after the lease, and applied once (by notice id)
            log.warning("rotation bridge: acknowledging failed (%s)", type(exc).__name__)

    async def _forward(self, message) -> bool:
        """True when the notification is on Kafka (or, malformed, in the DLQ, or needs nothing): ack it."""
        attributes = dict(message.attributes)
        try:
            notice = notice_from_pubsub(message.message_id, attributes, message.data, message.publish_time)
        except BadEvent as bad:
            return await self.dead_letter(None, message.data, bad.reason, bad.detail, {
                "source": f"pubsub:{self.subscription}:{message.message_id}",
                "attributes": json.dumps(attributes)[:4000],
            })
        if notice is None:  # nothing to invalidate (counted, and logged where it is news, by notice_from_pubsub)
            return True
        await self.publish(*notice.to_kafka())
        self.forwarded += 1
        return True

    async def stop(self) -> None:
        """Stop pulling; what this bridge has not acknowledged is redelivered to the next one."""
        self._stopping = True
        if self._task is not None and not self._task.done():
            self._task.cancel()
            try:
                await asyncio.wait_for(asyncio.shield(self._task), 10)
            except BaseException:
                pass

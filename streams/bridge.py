"""Pub/Sub -> Kafka bridge for Secret Manager notifications.

The Pub/Sub client calls back on its own threads; each message is handed to the event loop
(`run_coroutine_threadsafe`) and acknowledged from there only after Kafka acknowledged the produced notice (nacked if
producing failed, so Pub/Sub redelivers). Malformed messages go to the dead-letter topic, then are acked. Flow control
bounds the messages held at once; the streaming pull is restarted with backoff after errors.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Awaitable, Callable

from google.cloud import pubsub_v1

from keychain.settings import Settings

from .events import BadEvent
from .notices import notice_from_pubsub

log = logging.getLogger(__name__)

Publish = Callable[[bytes, bytes], Awaitable[None]]
DeadLetter = Callable[[bytes | None, bytes, str, str, dict[str, str]], Awaitable[bool]]


def subscription_path(settings: Settings) -> str:
    name = settings.rotation_subscription or ""
    if name.startswith("projects/"):
        return name
    if not settings.google_cloud_project:
        raise ValueError("KEYCHAIN_ROTATION_SUBSCRIPTION is a short name: set GOOGLE_CLOUD_PROJECT too")
    return f"projects/{settings.google_cloud_project}/subscriptions/{name}"


class RotationBridge:
    def __init__(self, settings: Settings, publish: Publish, dead_letter: DeadLetter):
        self.subscription = subscription_path(settings)
        self.settings = settings
        self.publish = publish
        self.dead_letter = dead_letter
        self.forwarded = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._subscriber: pubsub_v1.SubscriberClient | None = None
        self._pull = None
        self._stopping = False
        self._inflight: set[asyncio.Future] = set()

    @property
    def pulling(self) -> bool:
        return self._pull is not None and not self._pull.done()

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._subscriber = pubsub_v1.SubscriberClient()
        flow = pubsub_v1.types.FlowControl(
            max_messages=self.settings.pubsub_max_messages,
            max_bytes=64 * 1024 * 1024,
            # Also the stream's ack deadline: what a crashed bridge held is redelivered this soon (default 60 s).
            max_duration_per_lease_extension=self.settings.pubsub_ack_deadline_seconds,
        )
        backoff = 0.5
        while not self._stopping:
            self._pull = self._subscriber.subscribe(self.subscription, callback=self._on_message, flow_control=flow)
            log.info("rotation bridge pulling %s", self.subscription)
            try:
                await asyncio.wrap_future(self._pull)
                backoff = 0.5
            except asyncio.CancelledError:
                break
            except Exception as exc:  # the pull ended (emulator or network gone, subscription missing, ...)
                if self._stopping:
                    break
                log.warning("rotation bridge pull ended (%s); reconnecting in %.1fs", type(exc).__name__, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30)

    def _on_message(self, message) -> None:
        """On a Pub/Sub thread: never block here, never drop the future's outcome."""
        future = asyncio.run_coroutine_threadsafe(self._forward(message), self._loop)
        future.add_done_callback(self._report)

    @staticmethod
    def _report(future) -> None:
        if not future.cancelled() and future.exception() is not None:
            log.error("rotation bridge: forwarding failed", exc_info=future.exception())

    async def _forward(self, message) -> None:
        attributes = dict(message.attributes)
        try:
            notice = notice_from_pubsub(message.message_id, attributes, message.data, message.publish_time)
        except BadEvent as bad:
            sent = await self.dead_letter(None, message.data, bad.reason, bad.detail, {
                "source": f"pubsub:{self.subscription}:{message.message_id}",
                "attributes": json.dumps(attributes)[:4000],
            })
            if sent:
                message.ack()
            else:  # the broker did not take the dead letter: let Pub/Sub deliver the notification again
                message.nack()
            return
        if notice is None:
            log.info("rotation bridge: %s acknowledged", attributes.get("eventType"))
            message.ack()
            return
        try:
            await self.publish(*notice.to_kafka())
        except Exception:
            message.nack()
            raise
        message.ack()
        self.forwarded += 1

    async def stop(self) -> None:
        self._stopping = True
        if self._pull is not None:
            self._pull.cancel()  # stops pulling; messages not acked are redelivered to the next bridge
            try:
                await asyncio.wait_for(asyncio.wrap_future(self._pull), 10)
            except BaseException:
                pass
        if self._subscriber is not None:
            self._subscriber.close()

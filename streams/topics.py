"""The topics the worker reads and writes, and the one way to dead-letter a message."""

from __future__ import annotations

import logging

from keychain import metrics

from .app import app, settings

log = logging.getLogger(__name__)

execution_events = app.topic(settings.events_topic)
rotations = app.topic(settings.rotations_topic)
dead_letters = app.topic(settings.dlq_topic)


async def send_dead_letter(key: bytes | None, value: bytes, reason: str, detail: str, headers: dict[str, str]) -> None:
    """Produce the original bytes with the reason, and wait for the broker's acknowledgement."""
    log.warning("dead letter from %s: %s: %s", headers.get("source", "?"), reason, detail)
    metrics.DEAD_LETTERS.labels(reason).inc()
    all_headers = {"reason": reason, "detail": detail, **headers}
    # force: publish now, not attached to the event being processed (which is acknowledged only after this)
    sent = await dead_letters.send(
        key=key, value=value, headers={k: v.encode() for k, v in all_headers.items()}, force=True
    )
    await sent


async def publish_rotation(key: bytes, value: bytes) -> None:
    sent = await rotations.send(key=key, value=value, force=True)
    await sent

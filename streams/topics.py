"""The topics the worker reads and writes, and the one way to dead-letter a message."""

from __future__ import annotations

import asyncio
import hashlib
import logging


from . import metrics
from .app import app, settings

log = logging.getLogger(__name__)

# A dead letter the broker has not acknowledged within this is taken as refused: sent again by the caller, and seen
# (a dead letter to a topic the broker cannot take was seen neither taken nor refused for as long as it was watched).
# One that lands late anyway is a duplicate in the DLQ, never a loss.
DEAD_LETTER_SEND_SECONDS = 10.0
# Dead letters stay far below any producer's or broker's message limit (Kafka's default is 1 MiB).
DEAD_LETTER_MAX_BYTES = 256 * 1024
DEAD_LETTER_MAX_KEY_BYTES = 1024

execution_events = app.topic(settings.events_topic)
rotations = app.topic(settings.rotations_topic)
dead_letters = app.topic(settings.dlq_topic)


async def send_dead_letter(key: bytes | None, value: bytes | None, reason: str, detail: str,
                           headers: dict[str, str]) -> bool:
    """Produce the original bytes with the reason, and wait for the broker's acknowledgement. A value (or key) too
    big for any producer is cut to a prefix, with its size and SHA-256 in headers, so a dead letter always fits.
    Returns False when the broker did not take it within DEAD_LETTER_SEND_SECONDS: logged and counted, and the caller
    holds its batch and sends it again (streams/durable.py: deliver_dead_letters)."""
    source = headers.get("source", "?")
    log.warning("dead letter from %s: %s: %s", source, reason, detail)
    all_headers = {"reason": reason, "detail": detail[:1000], **headers}
    key, key_headers = _fitted(key, DEAD_LETTER_MAX_KEY_BYTES, "key")
    value, value_headers = _fitted(value, DEAD_LETTER_MAX_BYTES, "value")
    all_headers.update(key_headers, **value_headers)
    async def sent() -> None:
        # force: publish now, not attached to the event being processed (which is acknowledged only after this)
        await (await dead_letters.send(
            key=key, value=value, headers={k: v.encode() for k, v in all_headers.items()}, force=True
        ))

    try:
        await asyncio.wait_for(sent(), DEAD_LETTER_SEND_SECONDS)
    except Exception as exc:  # the broker refused or is gone: the caller holds the batch and sends this again
        log.error("dead letter from %s (%s) was not accepted by the broker: %s", source, reason, type(exc).__name__)
        metrics.DEAD_LETTERS_NOT_SENT.inc()
        return False
    metrics.DEAD_LETTERS.labels(reason).inc()
    return True


def _fitted(data: bytes | None, limit: int, what: str) -> tuple[bytes | None, dict[str, str]]:
    if data is None or len(data) <= limit:
        return data, {}
    return data[:limit], {f"original_{what}_bytes": str(len(data)),
                          f"original_{what}_sha256": hashlib.sha256(data).hexdigest(), f"{what}_truncated": "true"}


async def publish_rotation(key: bytes, value: bytes) -> None:
    sent = await rotations.send(key=key, value=value, force=True)
    await sent

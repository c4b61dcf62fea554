"""Rotation: the Pub/Sub bridge service, the invalidation agent and the leader-only reconciliation timer."""

from __future__ import annotations

import logging

from mode import Service

from .agents import handle_durably_with
from .app import app, runtime, settings
from .bridge import RotationBridge
from .events import BadEvent
from .notices import notice_from_kafka
from .topics import publish_rotation, rotations, send_dead_letter

log = logging.getLogger(__name__)


@app.service
class BridgeService(Service):
    """Runs the bridge in this worker whenever KEYCHAIN_ROTATION_SUBSCRIPTION is set."""

    bridge: RotationBridge | None = None

    async def on_start(self) -> None:
        if settings.rotation_subscription:
            self.bridge = runtime.bridge = RotationBridge(settings, publish_rotation, send_dead_letter)
            self.add_future(self.bridge.run())

    async def on_stop(self) -> None:
        if self.bridge is not None:
            await self.bridge.stop()


@app.agent(rotations)
async def invalidations(stream):
    await runtime.ready()
    async for events in stream.noack_take(settings.warm_batch_size, within=settings.warm_batch_seconds):
        for event in events:  # in order: invalidations of one secret share a partition
            message = event.message
            source = {"source": f"{message.topic}/{message.partition}/{message.offset}"}
            try:
                notice = notice_from_kafka(message.value)
                applied = await handle_durably_with(lambda: runtime.invalidator.apply(notice))
            except BadEvent as bad:
                await send_dead_letter(message.key, message.value, bad.reason, bad.detail, source)
            except Exception as exc:  # a bug, not bad input: keep the notice, in the DLQ, and keep going
                log.exception("notice failed; dead-lettering it")
                await send_dead_letter(message.key, message.value, "internal_error", type(exc).__name__, source)
            else:
                if applied.changed:
                    runtime.last_invalidation_lag_ms = round(applied.lag_ms, 1)
            await stream.ack(event)


@app.timer(interval=settings.reconcile_interval_seconds, on_leader=True)
async def reconcile() -> None:
    await runtime.ready()
    behind = await runtime.invalidator.reconcile()
    if behind:
        log.warning("reconcile: %d secret(s) were behind their latest version", behind)

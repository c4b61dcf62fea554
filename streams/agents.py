"""The faust wiring of the worker's work: one durable consume loop, the two agents that use it (execution events,
rotation notices), the leader-only timers (sweep and keep-warm, reconciliation) and the rotation bridge service.
Each is thin: the work itself is in the domain modules (warm, invalidate, bridge)."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timezone
from typing import Awaitable, Callable

from aiokafka.admin import AIOKafkaAdminClient
from mode import Service

from .app import app, runtime, settings
from .batches import Handled, Record, handle_batch
from .bridge import RotationBridge
from .topics import execution_events, publish_rotation, rotations, send_dead_letter

log = logging.getLogger(__name__)


async def consume_durably(
    stream,
    what: str,
    handle: Callable[[list[Record], Callable[[], None]], Awaitable[Handled]],
    within: float,
    in_flight: int = 1,
) -> None:
    """The one way a batch is consumed: handled (held through database outages), its dead letters sent and
    acknowledged by the broker, and only then its offsets acknowledged. `within`: the longest wait to fill a batch
    (faust checks the buffer at that period).

    `in_flight`: batches handled at once. The next batch starts once the earlier ones are done or waiting on
    something other than this process (the handler calls its second argument when it starts waiting for Secret
    Manager or for its write): events that arrive during a fetch are warmed meanwhile instead of queueing behind it,
    a burst's next batch is planned while the database writes the previous one, and a burst that keeps the process
    busy is still handled a full batch at a time. Offsets acknowledged out of order are committed only up to the
    first one still in flight (faust keeps the gaps); every handler is idempotent and fenced, so a batch handled
    beside an earlier one loses nothing and writes nothing stale."""
    await runtime.ready()
    slots = asyncio.Semaphore(in_flight)
    free = asyncio.Event()  # no batch is keeping this process busy: the next one may start
    free.set()
    running: set[asyncio.Future[None]] = set()
    failed: list[BaseException] = []

    async def consume(events: list) -> None:
        try:
            records = [Record(e.message.key, e.message.value, e.message.topic, e.message.partition, e.message.offset)
                       for e in events]
            result = await handle_batch(records, lambda batch: handle(batch, free.set))
            for dead in result.dead:
                await send_dead_letter(dead.record.key, dead.record.value, dead.reason, dead.detail,
                                       {"source": dead.record.source})
            for event in events:  # rows written durably, dead letters taken by the broker: offsets may commit
                await stream.ack(event)
            log.info("batch: %d %s, %s", len(records), what, result.summary())
        finally:
            free.set()
            slots.release()

    def done(task: asyncio.Future[None]) -> None:
        running.discard(task)
        if not task.cancelled() and task.exception() is not None:
            failed.append(task.exception())

    try:
        async for events in stream.noack_take(settings.warm_batch_size, within=within):
            await slots.acquire()
            await free.wait()
            free.clear()
            if failed:  # a batch failed past its own handling (not the database, not bad input): the agent stops
                raise failed[0]
            task = asyncio.ensure_future(consume(events))
            running.add(task)
            task.add_done_callback(done)
    finally:  # stopping: batches not finished are not acknowledged, and come again to whoever consumes next
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)


@app.agent(execution_events)
async def executions(stream):
    """Warm on start, purge on finish."""
    await consume_durably(stream, "events", lambda records, on_wait: runtime.warmer.handle(records, on_wait),
                          settings.warm_batch_seconds, settings.warm_batches_in_flight)


@app.agent(rotations)
async def invalidations(stream):
    """Stop serving what a rotation notice makes wrong, then refresh running executions' rows."""
    await consume_durably(stream, "notices", lambda records, _: runtime.invalidator.handle(records),
                          settings.notice_batch_seconds)


@app.task
async def report_at_start() -> None:
    """At start: the event loop the worker runs on (uvloop unless F_LOOP says otherwise), and the events topic's
    partition count, which bounds the replicas that get work (a warning when it is low)."""
    log.info("event loop: %s", type(asyncio.get_running_loop()).__module__.split(".")[0])
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers.split(","))
    try:
        await admin.start()
        described = await asyncio.wait_for(admin.describe_topics([settings.events_topic]), 10)
        count = len(described[0]["partitions"]) if described and not described[0].get("error_code") else None
    except Exception as exc:  # only a report: the worker runs on regardless
        log.warning("could not read the partition count of %s (%s)", settings.events_topic, type(exc).__name__)
        return
    finally:
        await admin.close()
    if count is not None and count < settings.topic_partitions:
        log.warning("events topic %s has %d partitions, fewer than KEYCHAIN_TOPIC_PARTITIONS=%d: replicas beyond %d "
                    "sit idle", settings.events_topic, count, settings.topic_partitions, count)
    else:
        log.info("events topic %s: %s partitions (replicas beyond that sit idle)", settings.events_topic, count)


@app.timer(interval=settings.sweep_interval_seconds, on_leader=True)
async def maintain() -> None:
    """Leader only: delete expired rows, and fetch again the global credentials in use that are about to expire."""
    await runtime.ready()
    swept = await runtime.sweep()
    runtime.last_sweep = {"at": datetime.now(timezone.utc).isoformat(), "rows": sum(swept.values()), "by_target": swept}
    log.info("sweep: %d expired rows deleted (%s)", sum(swept.values()),
             ", ".join(f"{target} {rows}" for target, rows in swept.items()))
    refreshed = await runtime.warmer.refresh_globals()
    if refreshed:
        log.info("keep-warm: %d global rows refreshed", refreshed)
    refreshed = await runtime.invalidator.refresh_stale()
    if refreshed:
        log.info("refresh: %d rows invalidated elsewhere (the CLI, another process) refreshed", refreshed)


@app.timer(interval=settings.reconcile_interval_seconds, on_leader=True)
async def reconcile() -> None:
    """Leader only: compare `latest` rows with Secret Manager (catches notices that were lost)."""
    await runtime.ready()
    behind = await runtime.invalidator.reconcile()
    if behind:
        log.warning("reconcile: %d secret(s) were behind their latest version", behind)


@app.service
class BridgeService(Service):
    """Runs the Pub/Sub -> Kafka bridge in this worker whenever KEYCHAIN_ROTATION_SUBSCRIPTION is set."""

    bridge: RotationBridge | None = None

    async def on_start(self) -> None:
        if settings.rotation_subscription:
            self.bridge = runtime.bridge = RotationBridge(settings, publish_rotation, send_dead_letter)
            self.add_future(self.bridge.run())

    async def on_stop(self) -> None:
        if self.bridge is not None:
            await self.bridge.stop()

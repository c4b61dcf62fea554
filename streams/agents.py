"""The faust wiring of the worker's work: what feeds the one durable consume loop (streams/durable.py: the execution
events straight through aiokafka, streams/consumer.py; the rotation notices through a faust agent), the leader-only
timers (sweep and keep-warm, reconciliation) and the rotation bridge service. Each is thin: the work itself is in the
domain modules (warm, invalidate, bridge)."""

from __future__ import annotations

import asyncio
import gc
import logging
from datetime import datetime, timezone
from typing import AsyncIterator

from aiokafka.admin import AIOKafkaAdminClient
from mode import Service

from .app import app, runtime, settings
from .batches import Record
from .bridge import RotationBridge
from .consumer import EventsConsumer
from .durable import consume_durably
from .topics import execution_events, publish_rotation, rotations, send_dead_letter

log = logging.getLogger(__name__)


async def faust_events(stream) -> AsyncIterator[tuple[list[Record], tuple]]:
    """A faust agent's stream, one event a batch, acknowledged by `faust_acknowledge` (the rotation notices: rare, and
    applied one after the other anyway; faust's batching `take(within=...)` wakes the event loop every `within`
    seconds while the topic is idle, 200 times a second at 5 ms)."""
    async for event in stream.noack().events():
        message = event.message
        yield [Record(message.key, message.value, message.topic, message.partition, message.offset)], (stream, event)


async def faust_acknowledge(token: tuple) -> None:
    stream, event = token
    await stream.ack(event)


@app.service
class Executions(Service):
    """Warm on start, purge on finish: the events topic, straight through aiokafka (streams/consumer.py). Stopping
    (SIGTERM), it takes no new batch, lets those in flight finish and commit (for up to the rebalance timeout), then
    leaves the group, so that its partitions move at once."""

    consumer: EventsConsumer | None = None
    consuming: asyncio.Future | None = None

    async def on_start(self) -> None:
        """Before the worker says it is ready: the runtime open and this member in the group with its assignment (a
        replica that starts beside others takes its share of the next burst)."""
        await runtime.ready()
        await execution_events.maybe_declare()  # created with KEYCHAIN_TOPIC_PARTITIONS when missing, as faust would
        self.consumer = EventsConsumer(settings)
        await self.consumer.start()
        joining = settings.broker_session_timeout_seconds + settings.broker_rebalance_timeout_seconds
        try:
            await asyncio.wait_for(self.consumer.assigned.wait(), joining)
        except asyncio.TimeoutError:
            log.warning("no assignment of the events topic yet after %.0f s; consuming once it comes", joining)
        settle_garbage_collector()
        # A loop that fails past its own handling crashes the worker (restarted by its supervisor), as an agent does.
        self.consuming = self.add_future(consume_durably(
            self.consumer.batches(), self.consumer.acknowledge, "events",
            lambda records, on_wait: runtime.warmer.handle(records, on_wait), send_dead_letter,
            settings.warm_batches_in_flight))

    async def on_stop(self) -> None:
        if self.consumer is not None:
            self.consumer.stop_taking()
        if self.consuming is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self.consuming), settings.broker_rebalance_timeout_seconds)
            except (asyncio.TimeoutError, Exception):
                self.consuming.cancel()
                await asyncio.gather(self.consuming, return_exceptions=True)
        if self.consumer is not None:
            await self.consumer.stop()


def settle_garbage_collector() -> None:
    """Once the worker has started: what it made so far (faust, aiokafka, gRPC, the pools: ~hundreds of thousands of
    objects) lives as long as the process, so it leaves the collector's reach (`gc.freeze`); and the young generation
    is collected every 100,000 allocations instead of 700 (refcounting frees nearly everything a burst allocates;
    a collection only finds cycles). Each collection traversed the whole heap: a start event cost 0.44 ms of CPU
    with the defaults, 0.19-0.28 ms without them (bench/README.md)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(100_000, 10, 10)


@app.agent(rotations)
async def invalidations(stream):
    """Stop serving what a rotation notice makes wrong, then refresh running executions' rows."""
    await runtime.ready()
    await consume_durably(faust_events(stream), faust_acknowledge, "notices",
                          lambda records, _: runtime.invalidator.handle(records), send_dead_letter)


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
    runtime.invalidator.deferred.kick()  # what targets must still apply, whoever recorded it (the CLI, a replica)
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

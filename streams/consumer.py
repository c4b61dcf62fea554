"""The execution events topic, consumed in batches straight through aiokafka, in the worker's own event loop.

NoETL writes a dozen records or more per step for every start the warmer acts on, and the warmer reads and ignores
nearly all of them: what it pays per record is what matters. faust's per-message path (its consumer thread and the
queues between it and the event loop, a Message and an Event per record, sensors, per-message acknowledgement) cost
~9x a plain aiokafka consumer's floor here (bench/README.md). So the events topic is read with `getmany` by this
consumer, and faust keeps the rest: the rotation notices' agent, the leader-only timers, the web server, the
lifecycle (agents.py runs this as one of the app's services).

Delivery is the one durable consume loop's (agents.consume_durably): a batch's offsets are committed only after its
rows are durable and its dead letters acknowledged by the broker, and, with batches in flight side by side, only up
to the first batch still in flight on each partition (`Offsets`). On a rebalance the partitions' batches in flight
are waited for (up to KEYCHAIN_BROKER_REBALANCE_TIMEOUT_SECONDS) and their offsets committed before the partitions
go; whatever is not committed comes again to the next owner (every handler is idempotent and fenced). The group is
KEYCHAIN_APP_ID (faust's own is KEYCHAIN_APP_ID-control: the two speak different group protocols).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import AsyncIterator

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import OffsetAndMetadata

from .batches import Record
from .settings import WorkerSettings

log = logging.getLogger(__name__)


class Batch:
    """A batch taken from the consumer: its records, and per partition the last offset it holds."""

    __slots__ = ("records", "last", "done")

    def __init__(self, records: list[Record], last: dict[TopicPartition, int]):
        self.records = records
        self.last = last
        self.done = False


class Offsets:
    """The batches taken and not yet committed, per partition in the order taken. A done batch commits its
    partitions' offsets only once every batch taken before it on that partition is done too."""

    def __init__(self) -> None:
        self._taken: dict[TopicPartition, deque[Batch]] = {}
        self.drained = asyncio.Event()  # no batch in flight
        self.drained.set()

    def take(self, batch: Batch) -> None:
        for tp in batch.last:
            self._taken.setdefault(tp, deque()).append(batch)
        if batch.last:
            self.drained.clear()

    def done(self, batch: Batch) -> dict[TopicPartition, OffsetAndMetadata]:
        """Mark a batch done; returns the offsets that may be committed now."""
        batch.done = True
        committable = {}
        for tp in batch.last:
            queue = self._taken.get(tp)
            last = None
            while queue and queue[0].done:
                last = queue.popleft().last[tp]
            if last is not None:
                committable[tp] = OffsetAndMetadata(last + 1, "")
        self._check_drained()
        return committable

    def forget(self, partitions) -> None:
        """Partitions that are no longer this consumer's: their batches in flight will come again to their owner."""
        for tp in partitions:
            self._taken.pop(tp, None)
        self._check_drained()

    def _check_drained(self) -> None:
        if not any(self._taken.values()):
            self.drained.set()


class EventsConsumer(ConsumerRebalanceListener):
    def __init__(self, settings: WorkerSettings):
        self.settings = settings
        self.offsets = Offsets()
        self._consumer: AIOKafkaConsumer | None = None
        self._stopping = False
        self.assigned = asyncio.Event()  # this member has its (first) assignment, possibly of no partition

    async def start(self) -> None:
        s = self.settings
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=[server.strip() for server in s.kafka_bootstrap_servers.split(",")],
            group_id=s.app_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=s.consumer_fetch_max_wait_ms,
            max_poll_records=s.warm_batch_size,
            session_timeout_ms=int(s.broker_session_timeout_seconds * 1000),
            heartbeat_interval_ms=int(s.broker_heartbeat_interval_seconds * 1000),
            rebalance_timeout_ms=int(s.broker_rebalance_timeout_seconds * 1000),
        )
        self._consumer.subscribe([s.events_topic], listener=self)
        await self._consumer.start()

    def stop_taking(self) -> None:
        """No batch after the one being fetched (`batches` ends within its fetch's 200 ms)."""
        self._stopping = True

    async def stop(self) -> None:
        self._stopping = True
        if self._consumer is not None:
            await self._consumer.stop()  # leaves the group: its partitions move at once
            self._consumer = None

    async def batches(self) -> AsyncIterator[tuple[list[Record], Batch]]:
        """Batches of what the consumer has buffered (up to KEYCHAIN_WARM_BATCH_SIZE records), as they come."""
        while not self._stopping:
            fetched = await self._consumer.getmany(timeout_ms=200, max_records=self.settings.warm_batch_size)
            if not fetched:
                continue
            records = [Record(r.key, r.value, r.topic, r.partition, r.offset)
                       for messages in fetched.values() for r in messages]
            batch = Batch(records, {tp: messages[-1].offset for tp, messages in fetched.items() if messages})
            self.offsets.take(batch)
            yield records, batch

    async def acknowledge(self, batch: Batch) -> None:
        """The batch's rows are durable and its dead letters taken: commit what may be committed now."""
        committable = self.offsets.done(batch)
        if committable and self._consumer is not None:
            try:
                await self._consumer.commit(committable)
            except KafkaError as exc:  # a rebalance took the partitions: their new owner reads the batch again
                log.warning("offsets not committed (%s): the records come again to the partitions' owner",
                            type(exc).__name__)

    # --- ConsumerRebalanceListener ----------------------------------------------------------------------------------
    async def on_partitions_revoked(self, revoked) -> None:
        """Before the partitions go: wait for the batches in flight (they commit as they finish), then let go."""
        if revoked:
            try:
                await asyncio.wait_for(self.offsets.drained.wait(), self.settings.broker_rebalance_timeout_seconds * 0.8)
            except asyncio.TimeoutError:
                log.warning("batches still in flight at a rebalance: their records come again to the next owner")
        self.offsets.forget(revoked)

    async def on_partitions_assigned(self, assigned) -> None:
        log.info("events topic: %d partition(s) assigned", len(assigned))
        self.assigned.set()

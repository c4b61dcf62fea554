"""The events consumer's offsets (streams/consumer.py): with batches in flight side by side, a partition's offset is
committed only up to the first batch still in flight on it; a revoked partition's batches are let go."""

import asyncio

from aiokafka import TopicPartition

from streams.consumer import Batch, Offsets

P0, P1 = TopicPartition("events", 0), TopicPartition("events", 1)


def batch(**last) -> Batch:
    return Batch([], {P0 if name == "p0" else P1: offset for name, offset in last.items()})


def committed(offsets: dict) -> dict:
    return {tp.partition: meta.offset for tp, meta in offsets.items()}


async def test_offsets_commit_only_up_to_the_first_batch_still_in_flight():
    offsets = Offsets()
    first, second, third = batch(p0=9, p1=4), batch(p0=19), batch(p0=29, p1=8)
    for b in (first, second, third):
        offsets.take(b)
    assert not offsets.drained.is_set()
    assert committed(offsets.done(second)) == {}  # the first is still in flight on partition 0
    assert committed(offsets.done(third)) == {}  # and on both partitions the first is before it
    assert committed(offsets.done(first)) == {0: 30, 1: 9}  # everything up to the third batch, on both partitions
    assert offsets.drained.is_set()


async def test_a_revoked_partition_is_let_go_and_the_rest_still_commits():
    offsets = Offsets()
    first, second = batch(p0=9, p1=4), batch(p1=7)
    offsets.take(first)
    offsets.take(second)
    offsets.forget([P1])  # a rebalance took partition 1: its records come again to its new owner
    assert committed(offsets.done(second)) == {}
    assert committed(offsets.done(first)) == {0: 10}
    assert offsets.drained.is_set()
    await asyncio.wait_for(offsets.drained.wait(), 1)

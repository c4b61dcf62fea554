"""Shared by the benchmarks: arguments, percentiles, alternated timing, the settings for a local stack, a worker of
its own and its CPU, a burst sent at the broker's pace, the last JSON line."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator, Awaitable, Callable

import psutil
from aiokafka import AIOKafkaProducer

from devtools.local import WorkerProcess, create_topics, finish_event, local_worker_env, produce
from devtools.stack import LocalStack
from keychain import Keychain
from streams.settings import WorkerSettings


def arguments(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="a smaller run, well under 60 s")
    parser.add_argument("--sm-delay-ms", type=float, default=250.0,
                        help="Secret Manager access latency modelled by the test server (the seed: 200-300 ms)")
    return parser.parse_args()


def percentile(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    if not ordered:
        return math.nan
    index = min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))
    return ordered[index]


async def alternated(calls: dict[str, Callable[[int], Awaitable[object]]], count: int) -> dict[str, list[float]]:
    """Time each call `count` times, all in one loop and in turn (the order reversed every other round), so that a
    figure and its baseline see the same moments of a noisy machine."""
    samples: dict[str, list[float]] = {name: [] for name in calls}
    order = list(calls.items())
    for i in range(count):
        for name, call in order if i % 2 else order[::-1]:
            started = time.perf_counter()
            await call(i)
            samples[name].append(time.perf_counter() - started)
    return samples


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def median_ms(samples: list[float]) -> float:
    return ms(statistics.median(samples))


def settings_for(stack: LocalStack, schema: str, **overrides) -> WorkerSettings:
    return WorkerSettings(dsn=stack.env["KEYCHAIN_DSN"], keys=stack.env["KEYCHAIN_KEYS"], schema_name=schema,
                    secret_manager_endpoint=stack.env.get("SECRET_MANAGER_ENDPOINT"), **overrides)


def report(figures: dict) -> None:
    """The figures, as the last line printed."""
    print(json.dumps(figures), flush=True)


async def send_burst(bootstrap: str, topic: str, messages: list[tuple[bytes, bytes]]) -> None:
    """Every message sent without waiting for the one before (aiokafka keeps each partition's order), then flushed: a
    burst whose pace is the broker's, not a round trip per message, so that what is measured is the workers'."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        sent = [await producer.send(topic, value, key=key) for key, value in messages]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()


def worker_cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


async def own_worker(stack: LocalStack, name: str) -> tuple[WorkerSettings, dict[str, str]]:
    """Settings and a worker's environment on topics (8 partitions), a schema and a group of their own."""
    settings = settings_for(stack, name.replace("-", "_"), events_topic=name, dlq_topic=f"{name}-dlq",
                            rotations_topic=f"{name}-rotations")
    await create_topics(stack.env["KAFKA_BOOTSTRAP_SERVERS"], settings.events_topic, settings.dlq_topic,
                        settings.rotations_topic, partitions=8)
    env = local_worker_env({**os.environ, **stack.env}, name, KEYCHAIN_SCHEMA=settings.schema_name,
                           KEYCHAIN_TOPIC_PARTITIONS="8", KEYCHAIN_EVENTS_TOPIC=settings.events_topic,
                           KEYCHAIN_DLQ_TOPIC=settings.dlq_topic, KEYCHAIN_ROTATIONS_TOPIC=settings.rotations_topic,
                           KEYCHAIN_CATALOG_SCHEMA=settings.schema_name)
    return settings, env


@asynccontextmanager
async def consuming_worker(kc: Keychain, bootstrap: str, settings: WorkerSettings,
                           env: dict[str, str]) -> AsyncIterator[WorkerProcess]:
    """A worker, yielded once it has handled an event sent to it (the finish of execution 1 is fenced); stopped after."""
    worker = WorkerProcess(env).start()
    try:
        await produce(bootstrap, settings.events_topic, [finish_event(1)])
        while not await kc.pool.fetchval("SELECT count(*) FROM keychain_finished_execution WHERE execution_id = 1"):
            await asyncio.sleep(0.05)
        yield worker
    finally:
        worker.stop()

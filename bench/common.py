"""Shared by the benchmarks: arguments, percentiles, alternated timing, the settings for a local stack, the last JSON
line."""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from typing import Awaitable, Callable

from streams.settings import WorkerSettings
from devtools.stack import LocalStack


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

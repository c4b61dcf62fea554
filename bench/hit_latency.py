"""Worker `get` hit latency and throughput, next to the floor (asyncpg SELECT 1 on the same pool, alternated with the
reads in one loop; the read's own statement alone, without decrypting or counting; and a bare one-row UPDATE ...
RETURNING, the floor of a read that would count itself in the row) and the ceiling it replaces (a Secret Manager
access through the official client, with the modelled latency).

    python -m bench.hit_latency [--quick]
"""

from __future__ import annotations

import asyncio
import statistics
import time

from keychain import Keychain, SecretManagerSource
from keychain.model import Scope
from keychain.queries import queries
from keychain.refs import SecretRef
from keychain.store import identity_args
from devtools.stack import LocalStack

from .common import alternated, arguments, median_ms, ms, percentile, report, settings_for

READERS = 16
REPEATS = 5


async def latencies(call, count: int) -> list[float]:
    samples = []
    for i in range(count):
        started = time.perf_counter()
        await call(i)
        samples.append(time.perf_counter() - started)
    return samples


async def throughput(call, readers: int, seconds: float) -> float:
    done = 0
    stop = time.perf_counter() + seconds

    async def reader(offset: int) -> None:
        nonlocal done
        i = offset
        while time.perf_counter() < stop:
            await call(i)
            done += 1
            i += readers

    await asyncio.gather(*(reader(k) for k in range(readers)))
    return done / seconds


async def run(stack: LocalStack, quick: bool) -> dict:
    settings = settings_for(stack, "bench_hit", pool_max_size=READERS, pool_min_size=READERS)
    count, seconds, sm_count, rows = (2000, 3.0, 5, 200) if quick else (20000, 10.0, 20, 1000)
    server = stack.secret_manager
    server.create_secret("bench-secret")
    server.add_version("bench-secret", "x" * 64)
    ref = SecretRef.parse("projects/test-project/secrets/bench-secret/versions/1")
    async with Keychain(settings, source=SecretManagerSource(settings)) as kc:
        await kc.migrate()
        for i in range(rows):
            await kc.put(f"cred-{i % 10}", {"token": "t" * 64}, execution_id=1_000_000 + i // 10)

        async def get(i: int) -> None:
            lookup = await kc.get(f"cred-{i % 10}", execution_id=1_000_000 + (i % rows) // 10)
            assert lookup

        async def select1(_: int) -> None:
            await kc.pool.fetchval("SELECT 1")

        # The floor of a read that counts itself: a one-row UPDATE ... RETURNING by primary key, asynchronous commit.
        some_id = await kc.pool.fetchval("SELECT min(id) FROM keychain")

        identities = [Scope.of(execution_id=1_000_000 + i // 10).identity(f"cred-{i % 10}") for i in range(rows)]

        async def statement_floor(i: int) -> None:
            assert await kc.pool.fetchrow(queries()["get_entry"], *identity_args(identities[i % rows]))

        async def update_floor(_: int) -> None:
            await kc.pool.fetchrow("UPDATE keychain SET accessed_at = now() WHERE id = $1 RETURNING data", some_id)

        await latencies(get, 200)  # warm up: prepare statements, fill the pool
        await latencies(select1, 200)
        # One loop alternating a SELECT 1 and a get on the same pool, so that both see the same moments of a noisy
        # machine; REPEATS times, for the spread of the ratio.
        ratios, get_samples, select_samples = [], [], []
        for _ in range(REPEATS):
            round_ = await alternated({"get": get, "select1": select1}, count // REPEATS)
            ratios.append(statistics.median(round_["get"]) / statistics.median(round_["select1"]))
            get_samples += round_["get"]
            select_samples += round_["select1"]
        floor = await alternated({"update": update_floor, "select1": select1}, count // REPEATS)
        floor_samples, floor_selects = floor["update"], floor["select1"]
        statement = await alternated({"statement": statement_floor, "select1": select1}, count // REPEATS)
        sm_samples = await latencies(lambda _: kc.source.access(ref), sm_count)
        get_per_s_1 = await throughput(get, 1, seconds / 2)
        get_per_s = await throughput(get, READERS, seconds)
        select1_per_s = await throughput(select1, READERS, seconds)
    get_p50, select_p50, sm_p50 = median_ms(get_samples), median_ms(select_samples), median_ms(sm_samples)
    return {
        "get_p50_ms": get_p50,
        "get_p99_ms": ms(percentile(get_samples, 99)),
        "select1_p50_ms": select_p50,
        "select1_p99_ms": ms(percentile(select_samples, 99)),
        "sm_p50_ms": sm_p50,
        "ratio_vs_select1": round(get_p50 / select_p50, 2),
        "ratio_vs_select1_min": round(min(ratios), 2),
        "ratio_vs_select1_max": round(max(ratios), 2),
        "statement_floor_vs_select1": round(
            statistics.median(statement["statement"]) / statistics.median(statement["select1"]), 2),
        "update_floor_p50_ms": median_ms(floor_samples),
        "update_floor_vs_select1": round(statistics.median(floor_samples) / statistics.median(floor_selects), 2),
        "speedup_vs_sm": round(sm_p50 / get_p50, 1),
        "get_per_s": round(get_per_s),
        "get_per_s_1_reader": round(get_per_s_1),
        "select1_per_s": round(select1_per_s),
        "readers": READERS,
        "samples": count,
    }


def main() -> None:
    args = arguments(__doc__.splitlines()[0])
    with LocalStack(kafka=False, pubsub=False, secret_manager_delay_seconds=args.sm_delay_ms / 1000) as stack:
        report(asyncio.run(run(stack, args.quick)))


if __name__ == "__main__":
    main()

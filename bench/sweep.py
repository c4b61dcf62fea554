"""Sweep: delete N expired rows among live ones, in bounded batches, while 16 readers keep reading live rows.
Reports rows/s and the readers' p99 during the sweep next to their p99 idle, measured in the same run.

    python -m bench.sweep [--quick]
"""

from __future__ import annotations

import asyncio
import time

from keychain import Keychain
from keychain.model import Entry, Scope
from devtools.stack import LocalStack

from .common import arguments, ms, percentile, report, settings_for

LIVE = 10_000
READERS = 16


async def read_for(kc: Keychain, stop: asyncio.Event, samples: list[float]) -> None:
    async def reader(offset: int) -> None:
        i = offset
        while not stop.is_set():
            started = time.perf_counter()
            lookup = await kc.get("live", execution_id=i % LIVE + 1)
            samples.append(time.perf_counter() - started)
            assert lookup, "a live row was not served"
            i += 7919

    await asyncio.gather(*(reader(k) for k in range(READERS)))


async def run(stack: LocalStack, quick: bool) -> dict:
    expired = 100_000 if quick else 1_000_000
    settings = settings_for(stack, "bench_sweep", pool_max_size=READERS + 2)
    async with Keychain(settings) as kc:
        await kc.migrate()
        for start in range(0, LIVE, 1000):
            await kc.rows.put_many([Entry("live", Scope.of(execution_id=e + 1), {"token": "t" * 40})
                               for e in range(start, start + 1000)])
        # Expired rows are never read: filler ciphertext is enough, written in one statement.
        await kc.pool.execute(
            """INSERT INTO keychain (credential_name, scope_type, execution_id, key_id, data, ttl_seconds,
                                     created_at, expires_at)
               SELECT 'expired', 'execution', g, 'k0', decode(repeat('ab', 80), 'hex'), 60,
                      now() - interval '2 hours', now() - interval '1 hour'
               FROM generate_series(100000000, 100000000 + $1 - 1) g""", expired)
        await kc.pool.execute("VACUUM ANALYZE keychain")
        idle, during = [], []
        stop = asyncio.Event()
        readers = asyncio.create_task(read_for(kc, stop, idle))
        await asyncio.sleep(3)
        stop.set()
        await readers
        stop = asyncio.Event()
        readers = asyncio.create_task(read_for(kc, stop, during))
        started = time.perf_counter()
        swept = await kc.maintenance.sweep()
        elapsed = time.perf_counter() - started
        stop.set()
        await readers
        live_left = await kc.pool.fetchval("SELECT count(*) FROM keychain")
    assert swept == expired and live_left == LIVE
    return {
        "expired_rows": expired,
        "live_rows": LIVE,
        "rows_per_s": round(swept / elapsed),
        "sweep_seconds": round(elapsed, 2),
        "reader_p99_idle_ms": ms(percentile(idle, 99)),
        "reader_p99_sweep_ms": ms(percentile(during, 99)),
        "reader_p50_idle_ms": ms(percentile(idle, 50)),
        "reader_p50_sweep_ms": ms(percentile(during, 50)),
        "p99_ratio": round(percentile(during, 99) / percentile(idle, 99), 2),
    }


def main() -> None:
    args = arguments(__doc__.splitlines()[0])
    with LocalStack(kafka=False, pubsub=False, secret_manager=False) as stack:
        report(asyncio.run(run(stack, args.quick)))


if __name__ == "__main__":
    main()

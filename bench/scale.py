"""Scale of the table: the worker's hit path, one reconciliation round and the sweep on a large keychain table, each
next to the same on a 10,000-row table measured in the same run (and the former reconciliation query, which
unnested the sources of every ready row, on the large table).

    python -m bench.scale [--quick] [--rows N]

Full size is 10,000,000 rows (most of the run fills the table); --quick uses 500,000.
Secret Manager answers at once here (no modelled delay): the reconciliation figure is our share of a round.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from typing import Awaitable, Callable

from devtools.stack import LocalStack
from keychain import Keychain, SecretManagerSource
from keychain.model import Entry, Provenance, Scope
from keychain.refs import SecretRef
from streams.invalidate import Invalidator
from streams.warm import Warmer

from .common import alternated, median_ms, ms, report, settings_for

SMALL = 10_000
SECRETS = 20  # the secrets every row holds through `latest`
READ_TARGETS = 2_000  # rows written through the library (readable), spread through the table
CHUNKS = 20
FILLER_BASE = 10_000_000_000  # execution ids of the filler rows, apart from the readable ones

# Filler: execution-scoped ready rows holding one of the secrets through `latest`, as the warmer writes them. They
# are never read, so filler ciphertext is enough, and one statement writes a chunk.
FILL = """
INSERT INTO keychain (credential_name, scope_type, execution_id, key_id, data, write_id, sources, ttl_seconds,
                      expires_at)
SELECT 'cred-' || (g % 5), 'execution', $3 + g / 5, 'k1', decode(repeat('ab', 80), 'hex'), g,
       jsonb_build_array(jsonb_build_object(
           'ref', 'projects/' || $4 || '/secrets/scale-' || (g % $5) || '/versions/latest',
           'secret', 'projects/*/secrets/scale-' || (g % $5), 'secret_id', 'scale-' || (g % $5), 'names', jsonb_build_array('projects/' || $4 || '/secrets/scale-' || (g % $5)),
           'pinned', false, 'alias', false, 'version', '1')),
       3600, now() + $6 * interval '1 second'
FROM generate_series($1::bigint, $2::bigint) g
"""

# The reconciliation query before migration 0006, measured on the large table as the baseline it replaced.
FORMER_RECONCILE = """
SELECT held.secret, held.ref, held.versions
FROM (
    SELECT src->>'secret' AS secret, min(src->>'ref') AS ref, array_agg(DISTINCT src->>'version') AS versions
    FROM keychain k, jsonb_array_elements(k.sources) AS src
    WHERE k.state = 'ready' AND src->>'ref' LIKE '%/versions/latest' AND src ? 'version'
    GROUP BY 1
) held
LEFT JOIN keychain_secret_state s USING (secret)
ORDER BY s.checked_at NULLS FIRST
LIMIT 50
"""


def ref_of(project: str, k: int) -> SecretRef:
    return SecretRef.parse(f"projects/{project}/secrets/scale-{k}/versions/latest")


async def fill(kc: Keychain, rows: int, project: str) -> list[tuple[str, int]]:
    """`rows` rows in CHUNKS chunks, each followed by its share of readable rows; returns the readable identities."""
    targets = []
    per_chunk, readable_per_chunk = (rows - READ_TARGETS) // CHUNKS, READ_TARGETS // CHUNKS
    for chunk in range(CHUNKS):
        first = chunk * per_chunk
        await kc.pool.execute(FILL, first, first + per_chunk - 1, FILLER_BASE, project, SECRETS, 3600.0)
        entries = []
        for i in range(readable_per_chunk):
            n = chunk * readable_per_chunk + i
            k = n % SECRETS
            name, execution_id = f"cred-{n % 5}", 1_000_000 + n
            provenance = Provenance(ref_of(project, k), f"projects/{project}/secrets/scale-{k}/versions/1")
            entries.append(Entry(name, Scope.of(execution_id=execution_id), {"token": "t" * 40}, (provenance,)))
            targets.append((name, execution_id))
        await kc.rows.put_many(entries)
    await kc.pool.execute("VACUUM ANALYZE keychain")
    return targets


async def expire(kc: Keychain, rows: int, project: str) -> None:
    """`rows` expired rows for the sweep, beside the live ones."""
    await kc.pool.execute(FILL, 0, rows - 1, 2 * FILLER_BASE, project, SECRETS, -3600.0)
    await kc.pool.execute("VACUUM ANALYZE keychain")


def reader(kc: Keychain, targets: list[tuple[str, int]], count: int) -> Callable[[int], Awaitable[None]]:
    """The i-th read of a readable row, drawn in advance (the draw is not timed)."""
    rng = random.Random(7)
    drawn = [rng.choice(targets) for _ in range(count)]

    async def read(i: int) -> None:
        name, execution_id = drawn[i]
        assert await kc.get(name, execution_id=execution_id), "a readable row was not served"

    return read


def round_of(invalidator: Invalidator) -> Callable[[int], Awaitable[None]]:
    async def reconcile(_: int) -> None:
        assert await invalidator.reconcile() == 0

    return reconcile


async def timed_sweep(kc: Keychain, expected: int) -> float:
    started = time.perf_counter()
    swept = await kc.maintenance.sweep()
    elapsed = time.perf_counter() - started
    assert swept == expected, (swept, expected)
    return swept / elapsed


async def run(stack: LocalStack, rows: int, quick: bool) -> dict:
    server = stack.secret_manager
    project = server.project_id
    for k in range(SECRETS):
        server.create_secret(f"scale-{k}")
        server.add_version(f"scale-{k}", f"value-{k}")
    expired = 100_000 if quick else 1_000_000
    gets, rounds = (5_000, 10) if quick else (20_000, 20)
    opened = []
    try:
        parts = {}
        for label, size in (("small", SMALL), ("large", rows)):
            settings = settings_for(stack, f"bench_scale_{label}", pool_max_size=4)
            kc = Keychain(settings)
            await kc.open()
            opened.append(kc)
            await kc.migrate()
            started = time.perf_counter()
            targets = await fill(kc, size, project)
            print(f"{label}: {size} rows in {time.perf_counter() - started:.0f} s", flush=True)
            source = SecretManagerSource(settings)
            parts[label] = (kc, targets, Invalidator(settings, kc, Warmer(settings, kc), source))
        (small_kc, small_targets, small_inv), (large_kc, large_targets, large_inv) = parts["small"], parts["large"]
        total = await large_kc.pool.fetchval("SELECT count(*) FROM keychain")
        held = await large_kc.pool.fetchval("SELECT count(*) FROM keychain_latest_held")

        await alternated({"small": reader(small_kc, small_targets, 500),
                          "large": reader(large_kc, large_targets, 500)}, 500)  # warm up
        get_samples = await alternated({"small": reader(small_kc, small_targets, gets),
                                        "large": reader(large_kc, large_targets, gets)}, gets)
        reconcilers = {"small": round_of(small_inv), "large": round_of(large_inv)}
        await alternated(reconcilers, 2)  # warm up: the client's channel, prepared statements
        round_samples = await alternated(reconcilers, rounds)
        started = time.perf_counter()
        await large_kc.pool.fetch(FORMER_RECONCILE)
        former_ms = ms(time.perf_counter() - started)

        await expire(small_kc, expired, project)
        await expire(large_kc, expired, project)
        sweep_small = await timed_sweep(small_kc, expired)
        sweep_large = await timed_sweep(large_kc, expired)
    finally:
        for kc in opened:
            await kc.close()
    get_small, get_large = median_ms(get_samples["small"]), median_ms(get_samples["large"])
    round_small, round_large = median_ms(round_samples["small"]), median_ms(round_samples["large"])
    return {
        "rows": total,
        "rows_small": SMALL,
        "latest_held_rows_large": held,
        "get_p50_ms_small": get_small,
        "get_p50_ms_large": get_large,
        "get_p50_ratio": round(get_large / get_small, 3),
        "reconcile_round_ms_small": round_small,
        "reconcile_round_ms_large": round_large,
        "reconcile_round_ratio": round(round_large / round_small, 3),
        "reconcile_round_spread_ms_large": ms(statistics.pstdev(round_samples["large"])),
        "former_reconcile_query_ms_large": former_ms,
        "sweep_rows_per_s_small": round(sweep_small),
        "sweep_rows_per_s_large": round(sweep_large),
        "sweep_ratio": round(sweep_large / sweep_small, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="500,000 rows instead of 10,000,000")
    parser.add_argument("--rows", type=int, help="rows of the large table")
    args = parser.parse_args()
    rows = args.rows or (500_000 if args.quick else 10_000_000)
    with LocalStack(kafka=False, pubsub=False) as stack:
        report(asyncio.run(run(stack, rows, args.quick)))


if __name__ == "__main__":
    main()

"""Every writer takes its locks in one global order (keychain/sql/queries.sql, "Lock order"): no race between
writers may ever deadlock, and no driver error ever reaches a caller of the library."""

import asyncio
import random

import asyncpg

from keychain.invalidation import Selection
from keychain import Keychain, SecretManagerSource
from keychain.errors import KeychainError
from keychain.model import Scope
from keychain.refs import SecretRef
from streams.invalidate import Invalidator
from streams.resolve import Want
from streams.warm import Warmer

from .conftest import make_settings

PROJECT = "test-project"
ROUNDS = 12


def ref_of(secret_id: str, version: str = "latest") -> SecretRef:
    return SecretRef.parse(f"projects/{PROJECT}/secrets/{secret_id}/versions/{version}")


def deadlock_retries() -> float:
    from keychain import metrics

    return sum(s.value for s in metrics.DATABASE_RETRIES.collect()[0].samples
               if s.name.endswith("_total") and s.labels.get("reason") == "deadlock")


async def deadlocks_seen(dsn: str) -> int:
    """PostgreSQL's own count of deadlocks detected in this database (every backend reports its own at exit)."""
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")
    finally:
        await conn.close()


async def test_writers_racing_on_overlapping_rows_never_deadlock(stack, settings, key_spec, keychain, sm, unique,
                                                                 execution_id):
    """Many rounds of, all at once on overlapping secrets and executions: two warm batches, read-throughs from three
    other processes (each reading in its own order), an invalidation with its re-warm, the purge of one execution,
    the sweep, hit counts being written, and a rekey. No writer is ever a deadlock victim (PostgreSQL's own count
    stays where it was, and the library never had to retry one), and every caller gets a value or a typed error."""
    secrets = [f"lo{i}-{unique}" for i in range(6)]
    for secret_id in secrets:
        sm.create_secret(secret_id)
        sm.add_version(secret_id, f"value-{secret_id}-1")
    sm.delay_seconds = 0.03  # calls overlap, so their writes come due together
    before_pg, before_retries = await deadlocks_seen(settings.dsn), deadlock_retries()
    readers = [Keychain(s, source=SecretManagerSource(s)) for s in
               [make_settings(stack, settings.schema_name, key_spec, shared_fetch_seconds=0.0) for _ in range(3)]]
    warm_settings = make_settings(stack, settings.schema_name, key_spec)
    warmer = Warmer(warm_settings, keychain)
    invalidator = Invalidator(warm_settings, keychain, warmer, keychain.source)
    failures: list[BaseException] = []
    rng = random.Random(unique)
    try:
        for reader in readers:
            await reader.open()
        for round_ in range(ROUNDS):
            executions = [execution_id + round_ * 10 + i for i in range(4)]
            wants = [Want(f"{unique}-exec-{s}", Scope.of(execution_id=e), ((None, ref_of(s)),))
                     for e in executions for s in secrets]
            wants += [Want(f"{unique}-global-{g}", Scope.of(), tuple((f"f{i}", ref_of(s)) for i, s in
                                                                     enumerate(rng.sample(secrets, 3))))
                      for g in range(4)]
            # Rows that are expired already (the sweep's work), some of them held by names the writers rewrite.
            await keychain.rows.put_many([])
            for e in executions[:2]:
                await keychain.put(f"{unique}-exec-{secrets[0]}", "old", execution_id=e, ttl_seconds=1)
            await asyncio.sleep(1.05 if round_ == 0 else 0)

            def shuffled(items: list) -> list:
                items = list(items)
                rng.shuffle(items)
                return items

            async def read_through(reader: Keychain) -> None:
                async def one(want: Want) -> None:
                    (_, ref), = want.fields
                    await reader.get_or_fetch(want.credential_name, ref, execution_id=want.scope.execution_id)
                    await reader.get(want.credential_name, execution_id=want.scope.execution_id)
                await asyncio.gather(*(one(w) for w in shuffled([w for w in wants if w.scope.type == "execution"])))
                await reader.flush_reads()

            async def invalidate_one() -> None:
                await asyncio.sleep(rng.random() * 0.05)
                secret_id = rng.choice(secrets)
                sm.add_version(secret_id, f"value-{secret_id}-r{round_}")
                await invalidator.invalidate(Selection.of(secret=ref_of(secret_id).secret_name), cause="operator")

            async def purge_one() -> None:
                await asyncio.sleep(rng.random() * 0.05)
                await keychain.maintenance.finish_execution(executions[-1])

            async def sweep() -> None:
                await asyncio.sleep(rng.random() * 0.05)
                await keychain.maintenance.sweep()

            async def rekey() -> None:
                await asyncio.sleep(rng.random() * 0.05)
                await keychain.maintenance.rekey(batch_size=7)

            work = [warmer.warm(shuffled(wants), skip_ready=False), warmer.warm(shuffled(wants), skip_ready=False),
                    *(read_through(r) for r in readers), invalidate_one(), purge_one(), sweep(), rekey()]
            outcomes = await asyncio.wait_for(asyncio.gather(*work, return_exceptions=True), 60)
            failures += [o for o in outcomes if isinstance(o, BaseException)]
    finally:
        for reader in readers:
            await reader.close()
    untyped = [f for f in failures if not isinstance(f, KeychainError)]
    assert not untyped, f"driver errors reached the callers: {[type(f).__name__ for f in untyped]}"
    assert not failures, f"callers failed: {[type(f).__name__ for f in failures]}"
    assert deadlock_retries() == before_retries, "the library had to retry a deadlock"
    await keychain.close()  # every connection of this test reports its counts as it exits
    assert await deadlocks_seen(settings.dsn) == before_pg, "PostgreSQL detected deadlocks between the writers"

"""The keychain's database: its pool, its transactions, and what becomes of the driver's errors.

Every public method of the Keychain runs under `typed_errors`: a caller only ever gets `keychain.errors` types, never
the driver's. Writers take their locks in one global order (keychain/sql/queries.sql, "Lock order"), so no two of them
can deadlock; a deadlock or serialization failure that still happens (another program's transaction on the same
tables, say) is retried a bounded number of times (`keychain_database_retries_total{reason}`) before the caller gets
`KeychainConflict`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

import asyncpg

from . import metrics
from .errors import CONNECTION_ERRORS, ConfigurationError, KeychainConflict, KeychainDatabaseError, KeychainError, \
    KeychainUnavailable
from .queries import queries
from .settings import Settings

log = logging.getLogger("keychain")
T = TypeVar("T")

# What a retry can cure: PostgreSQL rolled the transaction back because of another one. A closed set (metric label).
RETRYABLE: dict[type[Exception], str] = {
    asyncpg.DeadlockDetectedError: "deadlock",
    asyncpg.SerializationError: "serialization",
}
ATTEMPTS = 4
RETRY_DELAY_SECONDS = 0.02  # jittered, doubling: 0-20 ms, 0-40 ms, 0-80 ms


def typed_errors(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """A public method's errors as `keychain.errors` types: a database that cannot be reached is KeychainUnavailable,
    a write that kept losing to concurrent ones KeychainConflict, anything else the database refused
    KeychainDatabaseError. Messages name the error's class and SQLSTATE, never the driver's text (which may quote a
    row)."""

    @functools.wraps(method)
    async def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return await method(*args, **kwargs)
        except KeychainError:
            raise
        except CONNECTION_ERRORS as exc:
            raise KeychainUnavailable(f"the keychain database cannot be reached ({type(exc).__name__})") from None
        except tuple(RETRYABLE) as exc:  # a statement run outside `retrying`
            raise KeychainConflict(f"{method.__name__}: {RETRYABLE[type(exc)]} ({exc.sqlstate})") from None
        except asyncpg.PostgresError as exc:
            raise KeychainDatabaseError(
                f"{method.__name__}: the database refused it ({type(exc).__name__}, SQLSTATE {exc.sqlstate})") from None

    wrapper.typed_errors = True  # type: ignore[attr-defined]  # tests check that every public method has it
    return wrapper


async def retrying(what: str, work: Callable[[], Awaitable[T]]) -> T:
    """Run `work` (a whole transaction, or one statement) again when PostgreSQL rolled it back for a deadlock or a
    serialization failure: bounded, jittered, counted. Every write of the keychain is idempotent, so running it again
    is safe."""
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return await work()
        except tuple(RETRYABLE) as exc:
            reason = RETRYABLE[type(exc)]
            if attempt == ATTEMPTS:
                raise KeychainConflict(f"{what}: {reason} ({exc.sqlstate}), {ATTEMPTS} attempts") from None
            metrics.DATABASE_RETRIES.labels(reason).inc()
            log.warning("%s: %s (attempt %d of %d); retrying", what, reason, attempt, ATTEMPTS)
            await asyncio.sleep(random.uniform(0, RETRY_DELAY_SECONDS * 2 ** (attempt - 1)))
    raise AssertionError("unreachable")


@asynccontextmanager
async def durable_transaction(pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    """A transaction whose commit is flushed to disk (the pool commits asynchronously for read bookkeeping)."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(queries()["durable_commit"])
        yield conn


async def in_durable_transaction(pool: asyncpg.Pool, what: str, work: Callable[[asyncpg.Connection], Awaitable[T]]
                                 ) -> T:
    """`work` in a durable transaction, retried whole on a deadlock or serialization failure."""

    async def once() -> T:
        async with durable_transaction(pool) as conn:
            return await work(conn)

    return await retrying(what, once)


class Connector:
    """The bottom layer: the pool, the named statements (sql/queries.sql), durable transactions and retries. Every
    layer above it (rows.py, fetcher.py, reads.py, maintenance.py, the Keychain) reaches the database through one
    Connector, owned by the Keychain."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.q = queries()
        self._pool: asyncpg.Pool | None = None

    async def open(self) -> None:
        if self._pool is None:
            self._pool = await connect_pool(self.settings)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    @property
    def is_open(self) -> bool:
        return self._pool is not None

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise KeychainError("the keychain is not open: call `await keychain.open()` first")
        return self._pool

    async def transaction(self, what: str, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """`work` in a durable transaction (its commit flushed to disk), run again whole if PostgreSQL rolls it back
        for a deadlock or a serialization failure."""
        return await in_durable_transaction(self.pool, what, work)

    async def statement(self, what: str, name: str, *args: Any) -> str:
        """One named statement on its own (autocommit), run again if PostgreSQL rolls it back for a concurrent one."""
        return await retrying(what, lambda: self.pool.execute(self.q[name], *args))

    async def fetch(self, name: str, *args: Any) -> list[asyncpg.Record]:
        return await self.pool.fetch(self.q[name], *args)

    async def fetchrow(self, name: str, *args: Any) -> asyncpg.Record | None:
        return await self.pool.fetchrow(self.q[name], *args)

    async def fetchval(self, name: str, *args: Any) -> Any:
        return await self.pool.fetchval(self.q[name], *args)


async def connect_pool(settings: Settings, *, application_name: str = "keychain") -> asyncpg.Pool:
    try:
        return await asyncpg.create_pool(
            settings.dsn,
            min_size=settings.pool_min_size,
            max_size=settings.pool_max_size,
            server_settings={
                "search_path": settings.schema_name,
                # Hit bookkeeping is statistics: not worth an fsync per read. Writes turn it back on (durable_transaction).
                "synchronous_commit": "off",
                "application_name": application_name,
            },
            # asyncpg resets every connection it takes back (RESET ALL, UNLISTEN, ...): a second round trip per
            # read. Nothing here leaves session state behind (transactions close, locks and SETs are LOCAL).
            reset=_keep_session,
        )
    except ValueError:
        # The parser's message may quote the DSN, password included.
        raise ConfigurationError("KEYCHAIN_DSN is not a valid PostgreSQL DSN") from None
    except (OSError, asyncpg.PostgresError) as exc:
        raise ConfigurationError(f"cannot connect to KEYCHAIN_DSN: {type(exc).__name__}: {exc}") from None


async def _keep_session(_: asyncpg.Connection) -> None:
    return None


def affected(status: str) -> int:
    """Row count from a command status such as 'DELETE 3' or 'UPDATE 0'."""
    return int(status.rsplit(" ", 1)[-1])

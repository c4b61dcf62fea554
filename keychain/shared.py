"""Shared fetches: one Secret Manager call per secret version per burst, across every process on one keychain.

Whoever needs a reference (the warmer, a re-warm, a worker's read-through, in any process) first looks in
`keychain_fetched` for a version fetched within KEYCHAIN_SHARED_FETCH_SECONDS, unless the secret was invalidated
since (its rotation generation moved). Otherwise it takes the reference's advisory lock with `pg_try_advisory_lock`
on a connection of its own that every fetch of this process shares (the lock connection, which also LISTENs), so no
pooled connection is held and no transaction is open for the length of a Secret Manager call. The holder calls
(taking a token of the shared budget first), records the value (sealed with the key ring, bound to its reference,
fenced by the generation read before the call) and NOTIFYs; every process waiting for that reference wakes at once
and takes the value: its wait is what remained of the call in flight. A wake-up that got lost costs at most
RECHECK_SECONDS. If the holder dies, its connection, and so the lock, goes with it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Iterator

import asyncpg

from . import metrics
from .crypto import new_write_id
from .errors import CONNECTION_ERRORS, ConfigurationError, SecretUnavailable
from .model import RowIdentity
from .refs import SecretRef
from .sources import SecretValue

if TYPE_CHECKING:
    from .store import Keychain

log = logging.getLogger("keychain")

CHANNEL = "keychain_fetched"
RECHECK_SECONDS = 0.25


class SharedFetches:
    """Owned by a Keychain (its settings, statements, key ring, source and pool)."""

    def __init__(self, keychain: Keychain):
        self._kc = keychain
        self._conn: asyncpg.Connection | None = None  # the lock connection
        self._guard = asyncio.Lock()  # one statement at a time on the lock connection
        self._woken: dict[str, set[asyncio.Event]] = {}  # reference -> its waiters in this process
        self._publishing: dict[str, asyncio.Future[None]] = {}  # values being recorded for the other processes

    async def fetch(self, ref: SecretRef, *, reuse: bool = True) -> tuple[SecretValue, int]:
        """The value of `ref` and the secret's generation read before it was fetched (a write of it is fenced on
        that). `reuse=False` (keep-warm: a value about to expire) calls anew, and still shares what it fetched."""
        if self._kc.source is None:
            raise ConfigurationError("fetching needs a Secret Manager source: Keychain(settings, source=...)")
        if self._kc.settings.shared_fetch_seconds <= 0:  # no sharing
            generation, _ = await self._shared(ref, reuse=False)
            return await self._call(ref), generation
        key = str(ref)
        deadline = time.monotonic() + self._kc.settings.fetch_lock_timeout_seconds
        with self._listening(key) as woken:
            while True:
                woken.clear()  # before looking: a NOTIFY that comes after the look is not missed
                publishing = self._publishing.get(key)
                if publishing is not None:  # fetched here a moment ago (the lock is this process's until then)
                    await asyncio.shield(publishing)
                generation, shared = await self._shared(ref, reuse)
                if shared is not None:
                    return shared, generation
                if await self._try_lock(ref):
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise SecretUnavailable(str(ref), "another process has been fetching it for longer than "
                                                      f"{self._kc.settings.fetch_lock_timeout_seconds}s")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(woken.wait(), min(remaining, RECHECK_SECONDS))
        try:
            generation, shared = await self._shared(ref, reuse)  # recorded between the look and the lock
            if shared is not None:
                await self._unlock(ref)
                return shared, generation
            value = await self._call(ref)
        except BaseException:
            await asyncio.shield(self._unlock(ref))
            raise
        # The callers waiting in this process have the value now; the other processes get it a moment later.
        self._publishing[key] = task = asyncio.ensure_future(self._publish(ref, generation, value))
        task.add_done_callback(lambda done: self._publishing.pop(key) if self._publishing.get(key) is done else None)
        return value, generation

    async def _publish(self, ref: SecretRef, generation: int, value: SecretValue) -> None:
        """Record the value (which wakes the processes waiting for it), then let go of the reference."""
        try:
            await self._record(ref, generation, value)
        except Exception as exc:  # the others fetch it themselves once the lock is gone
            log.warning("a fetched value of %s was not shared: %s", ref.secret_name, type(exc).__name__)
        finally:
            await self._unlock(ref)

    async def open(self) -> None:
        async with self._guard:
            await self._connect()

    async def close(self) -> None:
        await asyncio.gather(*self._publishing.values(), return_exceptions=True)
        if self._conn is not None:
            with contextlib.suppress(*CONNECTION_ERRORS):
                await self._conn.close()
            self._conn = None

    # --- the table ------------------------------------------------------------------------------------------------
    async def _shared(self, ref: SecretRef, reuse: bool) -> tuple[int, SecretValue | None]:
        """The secret's generation now, and (when it is to be reused) the version of `ref` recorded within the window
        under it, or None."""
        row = await self._kc.pool.fetchrow(self._kc._q["shared_fetch"], str(ref),
                                           float(self._kc.settings.shared_fetch_seconds), ref.secret)
        if row["data"] is None or not reuse:
            return row["generation"], None
        sealed = self._kc.keyring.open(_identity(ref), row["key_id"], row["data"], row["write_id"])
        return row["generation"], SecretValue(row["version_name"], base64.b64decode(sealed))

    async def _record(self, ref: SecretRef, generation: int, value: SecretValue) -> None:
        write_id = new_write_id()
        kid, data = self._kc.keyring.seal(_identity(ref), base64.b64encode(value.payload).decode(), write_id)
        await self._kc.pool.execute(self._kc._q["record_fetch"], str(ref), ref.secret, generation,
                                    value.version_name, kid, data, write_id)

    async def _call(self, ref: SecretRef) -> SecretValue:
        """A Secret Manager call, on a token of the budget every process shares (waiting while it is spent)."""
        per_minute = float(self._kc.settings.secret_manager_max_calls_per_minute)
        if per_minute:
            wait = await self._kc.pool.fetchval(self._kc._q["take_call"], per_minute)
            if wait > 0:
                metrics.BUDGET_WAIT_SECONDS.inc(wait)
                await asyncio.sleep(wait)
        return await self._kc.source.access(ref)

    # --- the lock connection ----------------------------------------------------------------------------------------
    async def _try_lock(self, ref: SecretRef) -> bool:
        async with self._guard:
            try:
                conn = await self._connect()
                return await conn.fetchval(self._kc._q["try_lock_fetch"], str(ref))
            except CONNECTION_ERRORS:
                self._conn = None  # its locks went with it; the next fetch connects again
                raise

    async def _connect(self) -> asyncpg.Connection:
        """The lock connection (under the guard), listening for values recorded by any process."""
        if self._conn is None or self._conn.is_closed():
            self._conn = await asyncpg.connect(
                self._kc.settings.dsn, server_settings={"application_name": "keychain-fetch-locks"})
            await self._conn.add_listener(CHANNEL, self._notified)
        return self._conn

    async def _unlock(self, ref: SecretRef) -> None:
        async with self._guard:
            if self._conn is not None and not self._conn.is_closed():
                with contextlib.suppress(*CONNECTION_ERRORS):
                    await self._conn.fetchval(self._kc._q["unlock_fetch"], str(ref))

    @contextlib.contextmanager
    def _listening(self, ref: str) -> Iterator[asyncio.Event]:
        """An event set whenever a process records `ref`, for as long as the caller waits for it."""
        event = asyncio.Event()
        self._woken.setdefault(ref, set()).add(event)
        try:
            yield event
        finally:
            waiting = self._woken.get(ref, set())
            waiting.discard(event)
            if not waiting:
                self._woken.pop(ref, None)

    def _notified(self, _conn: object, _pid: int, _channel: str, ref: str) -> None:
        for event in self._woken.get(ref, ()):
            event.set()


def _identity(ref: SecretRef) -> RowIdentity:
    """What a shared value's ciphertext is bound to: its reference."""
    return RowIdentity(str(ref), "fetched", "")

"""The one fetcher: every fetch of a secret, by anyone (a worker's read-through, the warm, a re-warm), goes through
`Fetcher.fetch`, which owns all of it:

- the negative cache: a reference Secret Manager refused recently (NOT_FOUND, PERMISSION_DENIED, disabled) is not
  asked again, its error code is returned (every process sees a refusal one of them recorded); a later answer forgets
  the refusal, so the next one backs off from the first step again;
- the secret's identity (refs.SecretIdentity): the fence read before the call is the identity's generation, and the
  first answer for a project named by id teaches its number (keychain/projects.py);
- single flight in this process: one fetch per reference in flight, every caller awaits it;
- the shared window (KEYCHAIN_SHARED_FETCH_SECONDS): a version fetched within it by any process, the secret not
  invalidated since, is taken instead of calling again: from this process's memory, else from `keychain_fetched`
  (sealed with the key ring). The memory holds each value for the window only: a timer drops it then, so an idle
  process holds no plaintext past the window;
- across processes, one call at a time per reference: the holder of the reference's advisory lock (taken with
  `pg_try_advisory_lock` on the lock connection, which also LISTENs) calls, records and NOTIFYs; the others wake and
  take the recorded value;
- the retries: UNAVAILABLE and DEADLINE_EXCEEDED are retried here and nowhere else (the source makes one attempt),
  with jittered exponential backoff, until the caller's deadline; the lock is let go between attempts, so one process
  retrying does not hold the others;
- the shared call budget (SECRET_MANAGER_MAX_CALLS_PER_MINUTE).

A wake-up that got lost costs at most RECHECK_SECONDS. If the lock holder dies, its connection, and so the lock, goes
with it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import random
import time
from dataclasses import dataclass
from typing import Iterator

import asyncpg

from . import metrics
from .crypto import KeyRing, new_write_id
from .database import Connector, typed_errors
from .errors import CONNECTION_ERRORS, ConfigurationError, SecretSourceError, SecretUnavailable
from .model import RowIdentity
from .projects import ProjectNumbers
from .refs import SecretIdentity, SecretRef
from .sources import SecretManagerSource, SecretValue

log = logging.getLogger("keychain")

CHANNEL = "keychain_fetched"
RECHECK_SECONDS = 0.25
# Every statement on the lock connection answers within this (none of them waits for a lock): past it the database is
# taken for unreachable, and the connection, with its locks, is dropped.
LOCK_STATEMENT_SECONDS = 5.0


@dataclass(frozen=True)
class Fetched:
    value: SecretValue
    generation: int  # of the secret, read before the value was fetched: a write of it is fenced on that
    fence: str  # the identity key that generation is of (refs.SecretIdentity.key)

    @property
    def fence_pair(self) -> tuple[str, int]:
        return self.fence, self.generation


class Fetcher:
    def __init__(self, connector: Connector, keyring: KeyRing, source: SecretManagerSource | None,
                 projects: ProjectNumbers):
        self._db = connector
        self._settings = connector.settings
        self._keyring = keyring
        self.source = source
        self.projects = projects
        # (ref, reuse) -> the fetch in flight and the deadline it runs to (its first caller's)
        self._inflight: dict[tuple[str, bool], tuple[asyncio.Future[Fetched | str], float]] = {}
        self._memory: dict[str, tuple[float, Fetched]] = {}  # ref -> (fetched at, value): the shared window here
        self._conn: asyncpg.Connection | None = None  # the lock connection
        self._guard = asyncio.Lock()  # one statement at a time on the lock connection
        self._woken: dict[str, set[asyncio.Event]] = {}  # reference -> its waiters in this process
        self._publishing: dict[str, asyncio.Future[None]] = {}  # values being recorded for the other processes

    # --- the entry ------------------------------------------------------------------------------------------------
    @typed_errors
    async def fetch(self, ref: SecretRef, *, reuse: bool = True, deadline: float | None = None) -> Fetched | str:
        """The reference's remembered refusal (its error code), else its value and the secret's generation read
        before it was fetched. `reuse=False` (keep-warm: a value about to expire) calls anew, and still shares what
        it fetched. `deadline` (time.monotonic()): the retries of UNAVAILABLE stop there (default: one
        SECRET_MANAGER_TIMEOUT_SECONDS-long call and its retries within KEYCHAIN_FETCH_LOCK_TIMEOUT_SECONDS). A
        permanent refusal is recorded, then raised; UNAVAILABLE past the deadline is raised.

        Each caller keeps its own deadline: one that joins a fetch in flight waits for it until its own deadline at
        most, and when that fetch gave up at its first caller's earlier deadline, fetches again with the time it has
        left."""
        if reuse:
            remembered = self._remembered(str(ref))
            if remembered is not None:
                return remembered
        key = (str(ref), reuse)
        until = deadline or time.monotonic() + self._settings.fetch_lock_timeout_seconds
        while True:
            flight = self._inflight.get(key)
            if flight is None:
                flight = (asyncio.ensure_future(self._check_then_fetch(ref, reuse, until)), until)
                self._inflight[key] = flight
                flight[0].add_done_callback(
                    lambda _, ended=flight: self._inflight.pop(key) if self._inflight.get(key) is ended else None)
            future, runs_until = flight
            try:
                return await asyncio.wait_for(asyncio.shield(future), max(0.0, until - time.monotonic()))
            except asyncio.TimeoutError:
                raise SecretUnavailable(str(ref), "the deadline passed while its fetch was in flight") from None
            except SecretUnavailable:
                if runs_until >= until or time.monotonic() >= until:
                    raise
                # the flight ended at its first caller's earlier deadline; this caller has time left

    def forget(self, secret: SecretIdentity | None = None, *, any_project: bool = False) -> None:
        """Drop this process's values of one secret (its invalidation: with `any_project`, of the secret's id and
        location in every project), or of all. Values of references whose project is not known yet go with any
        project's."""
        def reached(ref: str) -> bool:
            held = self.projects.known(SecretRef.parse(ref))
            if secret is None or held == secret:
                return True
            same_path = held.path == secret.path
            return same_path and (any_project or not held.known or not secret.known)

        for ref in [r for r in self._memory if reached(r)]:
            del self._memory[ref]

    @property
    def values_held(self) -> int:
        """Plaintext values this process holds in memory (the shared window's)."""
        return len(self._memory)

    @typed_errors
    async def record_failure(self, ref: str | SecretRef, code: str) -> None:
        ref = ref if isinstance(ref, SecretRef) else SecretRef.parse(ref)
        await self._db.transaction("record_failure", lambda conn: conn.execute(
            self._db.q["record_failure"], str(ref), code, float(self._settings.negative_ttl_seconds),
            self.projects.known(ref).key))

    async def _check_then_fetch(self, ref: SecretRef, reuse: bool, deadline: float) -> Fetched | str:
        refusal = await self._db.fetchrow("refusal_of", str(ref))
        if refusal is not None and refusal["active"]:
            return refusal["error_code"]
        delay = self._settings.secret_manager_retry_initial_seconds
        while True:
            try:
                fetched = await self._shared_fetch(ref, reuse, deadline)
            except SecretSourceError as exc:
                if exc.permanent:
                    await self.record_failure(ref, exc.code)
                    raise
                wait = random.uniform(delay / 2, delay)
                if time.monotonic() + wait >= deadline:
                    raise
                metrics.SECRET_MANAGER_RETRIES.inc()
                log.warning("Secret Manager %s for %s; retrying in %.2fs", exc.code, ref.secret_name, wait)
                await asyncio.sleep(wait)
                delay = min(delay * 2, self._settings.secret_manager_retry_max_seconds)
                continue
            if refusal is not None:  # answered since it was refused: a later refusal backs off from the start
                await self._db.statement("forget_failure", "forget_failure", str(ref))
            self._remember(str(ref), fetched)
            return fetched

    # --- this process's window ------------------------------------------------------------------------------------
    def _remembered(self, ref: str) -> Fetched | None:
        held = self._memory.get(ref)
        if held is None or time.monotonic() - held[0] >= self._settings.shared_fetch_seconds:
            return None
        return held[1]

    def _remember(self, ref: str, fetched: Fetched) -> None:
        window = self._settings.shared_fetch_seconds
        if window <= 0:
            return
        entry = (time.monotonic(), fetched)
        self._memory[ref] = entry
        # Dropped when the window ends, read or not: an idle process holds no value past it.
        asyncio.get_running_loop().call_later(window, self._drop, ref, entry)

    def _drop(self, ref: str, entry: tuple[float, Fetched]) -> None:
        if self._memory.get(ref) is entry:
            del self._memory[ref]

    # --- across processes -----------------------------------------------------------------------------------------
    async def _shared_fetch(self, ref: SecretRef, reuse: bool, deadline: float) -> Fetched:
        if self.source is None:
            raise ConfigurationError("fetching needs a Secret Manager source: Keychain(settings, source=...)")
        fence = (await self.projects.identity(ref)).key
        if self._settings.shared_fetch_seconds <= 0:  # no sharing
            generation, _ = await self._shared(ref, fence, reuse=False)
            await self._wait_for_budget(ref, deadline)
            return Fetched(await self._call(ref, deadline), generation, fence)
        key, budgeted = str(ref), False
        while True:
            with self._listening(key) as woken:
                while True:
                    woken.clear()  # before looking: a NOTIFY that comes after the look is not missed
                    publishing = self._publishing.get(key)
                    if publishing is not None:  # fetched here a moment ago (the lock is this process's until then)
                        await asyncio.shield(publishing)
                    generation, shared = await self._shared(ref, fence, reuse)
                    if shared is not None:
                        return Fetched(shared, generation, fence)
                    if await self._try_lock(ref):
                        break
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise SecretUnavailable(str(ref), "another process was still fetching it at the deadline")
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(woken.wait(), min(remaining, RECHECK_SECONDS))
            try:
                generation, shared = await self._shared(ref, fence, reuse)  # recorded between the look and the lock
                if shared is not None:
                    await self._unlock(ref)
                    return Fetched(shared, generation, fence)
                wait = 0.0 if budgeted else await self._take_call()
                budgeted = True
                if wait <= 0:
                    value = await self._call(ref, deadline)
            except BaseException:
                await asyncio.shield(self._unlock(ref))
                raise
            if wait <= 0:
                break
            # The shared budget is spent: wait for its turn without holding the reference's lock (another process
            # that fetches it meanwhile answers this one), and never past the deadline; then look again.
            await self._unlock(ref)
            await self._sleep_for_budget(ref, wait, deadline)
        # The callers waiting in this process have the value now; the other processes get it a moment later.
        self._publishing[key] = task = asyncio.ensure_future(self._publish(ref, fence, generation, value))
        task.add_done_callback(lambda done: self._publishing.pop(key) if self._publishing.get(key) is done else None)
        return Fetched(value, generation, fence)

    async def _publish(self, ref: SecretRef, fence: str, generation: int, value: SecretValue) -> None:
        """Record the value (which wakes the processes waiting for it), then let go of the reference."""
        try:
            await self._record(ref, fence, generation, value)
        except Exception as exc:  # the others fetch it themselves once the lock is gone
            log.warning("a fetched value of %s was not shared: %s", ref.secret_name, type(exc).__name__)
        finally:
            await self._unlock(ref)

    @typed_errors
    async def open(self) -> None:
        """Connect what a first fetch would otherwise connect on its way: the lock connection, the Secret Manager
        channel."""
        async with self._guard:
            await self._connect()
        if self.source is not None:
            await self.source.connect()

    @typed_errors
    async def close(self) -> None:
        pending = [future for future, _ in self._inflight.values() if not future.done()]
        for future in pending:
            future.cancel()
        await asyncio.gather(*pending, *self._publishing.values(), return_exceptions=True)
        self._memory.clear()
        if self._conn is not None:
            with contextlib.suppress(*CONNECTION_ERRORS):
                await self._conn.close()
            self._conn = None

    async def _shared(self, ref: SecretRef, fence: str, reuse: bool) -> tuple[int, SecretValue | None]:
        """The generation now of the secret the fetch is fenced on, and (when it is to be reused) the version of `ref`
        recorded within the window under it, or None."""
        row = await self._db.fetchrow("shared_fetch", str(ref), float(self._settings.shared_fetch_seconds), fence)
        if row["data"] is None or not reuse:
            return row["generation"], None
        sealed = self._keyring.open(_identity(ref), row["key_id"], row["data"], row["write_id"])
        await self.projects.learn(ref, row["version_name"])
        return row["generation"], SecretValue(row["version_name"], base64.b64decode(sealed))

    async def _record(self, ref: SecretRef, fence: str, generation: int, value: SecretValue) -> None:
        write_id = new_write_id()
        kid, data = self._keyring.seal(_identity(ref), base64.b64encode(value.payload).decode(), write_id)
        await self._db.pool.execute(self._db.q["record_fetch"], str(ref), fence, generation,
                                    value.version_name, kid, data, write_id)

    async def _take_call(self) -> float:
        """One call from the budget every process shares (SECRET_MANAGER_MAX_CALLS_PER_MINUTE): the seconds to wait
        for its turn (0: now)."""
        per_minute = float(self._settings.secret_manager_max_calls_per_minute)
        return await self._db.fetchval("take_call", per_minute) if per_minute else 0.0

    async def _sleep_for_budget(self, ref: SecretRef, wait: float, deadline: float) -> None:
        if time.monotonic() + wait >= deadline:
            raise SecretUnavailable(str(ref), "the shared Secret Manager call budget is spent past the deadline")
        metrics.BUDGET_WAIT_SECONDS.inc(wait)
        await asyncio.sleep(wait)

    async def _wait_for_budget(self, ref: SecretRef, deadline: float) -> None:
        wait = await self._take_call()
        if wait > 0:
            await self._sleep_for_budget(ref, wait, deadline)

    async def _call(self, ref: SecretRef, deadline: float) -> SecretValue:
        """One Secret Manager call (its budget already taken), within what remains of the deadline."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise SecretUnavailable(str(ref), "the deadline passed before the call")
        value = await self.source.access(ref, timeout=min(remaining, self._settings.secret_manager_timeout_seconds))
        await self.projects.learn(ref, value.version_name)
        return value

    # --- the lock connection ----------------------------------------------------------------------------------------
    async def _try_lock(self, ref: SecretRef) -> bool:
        async with self._guard:
            try:
                conn = await self._connect()
                return await conn.fetchval(self._db.q["try_lock_fetch"], str(ref))
            except CONNECTION_ERRORS:
                await self._drop_lock_connection()  # its locks go with it; the next fetch connects again
                raise

    async def _connect(self) -> asyncpg.Connection:
        """The lock connection (under the guard), listening for values recorded by any process."""
        if self._conn is None or self._conn.is_closed():
            self._conn = await asyncpg.connect(
                self._settings.dsn, server_settings={"application_name": "keychain-fetch-locks"},
                timeout=LOCK_STATEMENT_SECONDS, command_timeout=LOCK_STATEMENT_SECONDS)
            await self._conn.add_listener(CHANNEL, self._notified)
        return self._conn

    async def _unlock(self, ref: SecretRef) -> None:
        async with self._guard:
            if self._conn is not None and not self._conn.is_closed():
                try:
                    await self._conn.fetchval(self._db.q["unlock_fetch"], str(ref))
                except CONNECTION_ERRORS:  # unanswered: dropping the connection lets go of its locks
                    await self._drop_lock_connection()

    async def _drop_lock_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()

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


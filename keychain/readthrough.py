"""The read-through: a read that misses fetches its secret from Secret Manager, stores it and returns it.

Owned by a Keychain, which hands it its one-statement lookup, its rows and its fetcher. Misses of one secret call
Secret Manager once, whichever rows they are for: they join the fetch of it in flight or just done, in this process
or in any other, the warmer's included (keychain/fetcher.py). Rows of the
read-throughs of one moment are written together, in one transaction. The cache only ever makes a read slower, never
fails it: while the database cannot be read the value comes straight from Secret Manager, and a value fetched whose
row cannot be written is returned all the same (`direct`, logged).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable, TypeVar

import asyncpg

from . import metrics
from .errors import (
    CONNECTION_ERRORS, CachedFailure, KeychainConflict, KeychainDatabaseError, KeychainError, KeychainUnavailable,
)
from .fetcher import Fetcher
from .model import Entry, Lookup, Provenance, RowIdentity, Scope, value_from_payload
from .refs import SecretRef
from .rows import Rows

log = logging.getLogger("keychain")
T = TypeVar("T")

# The cache cannot be read (down, or refusing): serve straight from Secret Manager, write nothing.
_CACHE_UNREADABLE = (KeychainUnavailable, KeychainConflict, KeychainDatabaseError, *CONNECTION_ERRORS,
                     asyncpg.PostgresError)

Lookups = Callable[[RowIdentity, SecretRef], Awaitable[Lookup]]


class ReadThrough:
    def __init__(self, lookup: Lookups, rows: Rows, fetcher: Fetcher):
        self._lookup = lookup
        self._rows = rows
        self._fetcher = fetcher
        self._inflight: dict[tuple[str, str, str, str], asyncio.Future[Any]] = {}
        self._to_write: list[tuple[Entry, asyncio.Future[bool]]] = []  # read-throughs' rows (_write_together)
        self._writer: asyncio.Future[None] | None = None

    async def close(self) -> None:
        """Fetches still in flight (their callers gone) stop, and rows being written are written, while the pool
        is open."""
        pending = [future for future in self._inflight.values() if not future.done()]
        for future in pending:
            future.cancel()
        await asyncio.gather(*pending, *([self._writer] if self._writer else []), return_exceptions=True)

    async def get_or_fetch(self, identity: RowIdentity, scope: Scope, ref: SecretRef, ttl_seconds: int | None
                           ) -> Lookup:
        try:
            lookup = await self._lookup(identity, ref)
            if lookup:
                return lookup
            # One flight per row AND reference: two readers of one name that want different secrets (another
            # project's, another version) each get their own.
            return await self._single_flight((*identity, str(ref)),
                                             lambda: self._read_through(identity, scope, ref, ttl_seconds))
        except _CACHE_UNREADABLE:
            return await self._single_flight(("", "direct", "", str(ref)), lambda: self._fetch_direct(ref))

    async def _fetch_direct(self, ref: SecretRef) -> Lookup:
        if self._fetcher.source is None:
            raise KeychainUnavailable("the keychain database cannot be reached, and there is no Secret Manager source")
        secret = await self._fetcher.source.access(ref)
        metrics.READ_OUTCOMES["direct"].inc()
        log.warning("keychain cannot be read: served %s straight from Secret Manager", ref.secret_name)
        return Lookup("direct", value_from_payload(secret.payload))

    async def _single_flight(self, key: tuple[str, str, str, str], make: Callable[[], Awaitable[T]]) -> T:
        """One call of `make` per key in flight in this process; every caller awaits it (a caller that gives up
        leaves it running for the others)."""
        future = self._inflight.get(key)
        if future is None:
            future = asyncio.ensure_future(make())
            self._inflight[key] = future
            future.add_done_callback(lambda _: self._inflight.pop(key, None))
        return await asyncio.shield(future)

    async def _read_through(self, identity: RowIdentity, scope: Scope, ref: SecretRef, ttl_seconds: int | None
                            ) -> Lookup:
        """Fetch the reference (the fetcher: shared with every fetch of it in flight or just done, in this process
        and in any other), then write the row in a short transaction, fenced by the secret's generation: fetched
        again (three times at most) only if the secret was invalidated meanwhile. A permanent refusal is recorded
        (the next reads get CachedFailure) and raised."""
        for _ in range(3):
            fetched = await self._fetcher.fetch(ref)
            if isinstance(fetched, str):
                raise CachedFailure(identity.credential_name, fetched)
            entry = Entry(identity.credential_name, scope, value_from_payload(fetched.value.payload),
                          sources=(Provenance(ref, fetched.value.version_name),), ttl_seconds=ttl_seconds,
                          fences=(fetched.fence_pair,))
            try:
                written = await self._write_together(entry)
            except KeychainError as exc:  # the row is a cache fill, not what the reader asked for
                metrics.READ_OUTCOMES["direct"].inc()
                log.warning("read-through of %s: served from Secret Manager, not stored (%s)",
                            identity.credential_name, type(exc).__name__)
                return Lookup("direct", entry.value)
            if written:
                return Lookup("hit", entry.value)
            # invalidated since it was fetched: fetch the new value
            self._fetcher.forget(self._fetcher.projects.known(ref))
        raise KeychainError(f"{identity.credential_name}: invalidated three times while fetching")
    async def _write_together(self, entry: Entry) -> bool:
        """A read-through's row, written with those of the other read-throughs of this moment in one transaction
        (a burst of first reads would otherwise queue a transaction each on the pool). True when written, False when
        fenced (the secret was invalidated after its generation was read)."""
        written = asyncio.get_running_loop().create_future()
        self._to_write.append((entry, written))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.ensure_future(self._write_pending())
        return await asyncio.shield(written)

    async def _write_pending(self) -> None:
        await asyncio.sleep(0)  # the read-throughs that are ready in this loop iteration join the first batch
        while self._to_write:
            batch = [(e.identity, e, written) for e, written in self._to_write]
            self._to_write = []
            latest = {identity: e for identity, e, _ in batch}  # a statement writes a row once
            try:
                fenced = await self._rows.put_many(list(latest.values()))
            except Exception as exc:
                for _, _, written in batch:
                    if not written.done():
                        written.set_exception(exc)
                continue
            for identity, _, written in batch:
                if not written.done():
                    written.set_result(latest[identity] not in fenced)

"""The Keychain: what a worker that reads secrets uses (get, get_or_fetch, put), over the library's layers:

    Keychain (readers)            Maintenance (the worker, the CLI: maintenance.py)
    ReadThrough (readthrough.py)  ReadCounts (reads.py)
    Rows (rows.py)                Fetcher (fetcher.py: shared fetch, negative cache, single flight, retries)
    Connector (database.py: the pool, named statements, durable transactions, typed errors)

A Keychain owns one of each, built on one Connector, and hands the worker its `rows`, `fetcher` and `maintenance`.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Iterable

from . import metrics
from .crypto import KeyRing
from .database import Connector, typed_errors
from .errors import CachedFailure, DecryptionError
from .fetcher import Fetcher
from .maintenance import Maintenance
from .migrate import migrate
from .model import Entry, Lookup, Provenance, RowIdentity, Scope
from .projects import ProjectNumbers
from .reads import ReadCounts
from .readthrough import ReadThrough
from .refs import SecretIdentity, SecretRef
from .rows import Rows
from .settings import Settings
from .sources import SecretManagerSource

log = logging.getLogger("keychain")


class Keychain:
    """Owns a connection pool and the key ring. Use `async with Keychain(settings) as kc:` or open()/close()."""

    def __init__(self, settings: Settings, *, source: SecretManagerSource | None = None):
        self.settings = settings
        self.keyring = KeyRing.parse(settings.keys.get_secret_value())
        self.source = source
        self._db = Connector(settings)
        self.projects = ProjectNumbers(self._db)
        self.rows = Rows(self._db, self.keyring)
        self.fetcher = Fetcher(self._db, self.keyring, source, self.projects)
        self._reads = ReadCounts(self._db)
        self.maintenance = Maintenance(self._db, self.keyring, self.fetcher, self._reads, self.projects)
        self._read_through = ReadThrough(self._lookup, self.rows, self.fetcher)

    # --- lifecycle ----------------------------------------------------------------------------------------------
    @typed_errors
    async def open(self) -> "Keychain":
        await self._db.open()
        return self

    @typed_errors
    async def close(self) -> None:
        await self._read_through.close()
        await self.fetcher.close()
        await self._reads.close()
        await self._db.close()
        if self.source is not None:
            await self.source.close()

    async def __aenter__(self) -> "Keychain":
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def pool(self):
        return self._db.pool

    @typed_errors
    async def migrate(self) -> list[int]:
        async with self.pool.acquire() as conn:
            return await migrate(conn, self.settings.schema_name)

    # --- read -----------------------------------------------------------------------------------------------------
    @typed_errors
    async def get(
        self, name: str, *, execution_id: int | None = None, session_id: str | None = None, scope: str | None = None
    ) -> Lookup:
        """Read one entry in one statement, hit or miss. Raises CachedFailure for a remembered refusal."""
        identity = Scope.of(execution_id=execution_id, session_id=session_id, scope=scope).identity(name)
        return await self._lookup(identity)

    @typed_errors
    async def flush_reads(self) -> int:
        """Write the hit counts held in memory now (done every KEYCHAIN_READ_FLUSH_SECONDS and at close); returns the
        rows updated."""
        return await self._reads.flush()

    async def _lookup(self, identity: RowIdentity, ref: SecretRef | None = None) -> Lookup:
        """One read, one round trip, hit or not; with `ref`, only a value that came from that reference is served. A
        hit is counted in memory (keychain/reads.py)."""
        started = time.perf_counter()
        if ref is None:
            row = await self.pool.fetchrow(self._db.q["get_entry"], *identity_args(identity))
        else:
            row = await self.pool.fetchrow(self._db.q["get_entry_from"], *identity_args(identity),
                                           source_pattern(ref, self.projects.known(ref)))
        metrics.READ_SECONDS.observe(time.perf_counter() - started)
        if row is None:
            lookup = Lookup("miss")
        else:
            row_id, key_id, data, write_id, reads_since_write, written_at, refused, error_code = row
            if refused is not None:  # expired, stale, failed, or other_source (holding another secret than asked for)
                lookup = Lookup(refused, error_code=error_code)
            else:
                try:
                    lookup = Lookup("hit", self.keyring.open(identity, key_id, data, write_id))
                except DecryptionError:
                    metrics.READS.labels("error").inc()
                    raise
                if self._reads.counted(row_id, write_id, reads_since_write):
                    metrics.WARM_LEAD_SECONDS.observe(max(0.0, time.time() - written_at.timestamp()))
        metrics.READ_OUTCOMES[lookup.outcome].inc()
        # A hit is the common case, thousands a second: DEBUG. Anything else is worth a line at INFO.
        log.log(logging.DEBUG if lookup.outcome == "hit" else logging.INFO, "keychain %s credential=%s scope=%s id=%s",
                lookup.outcome, identity.credential_name, identity.scope_type, identity.scope_id or "-")
        if lookup.outcome == "failed":
            raise CachedFailure(identity.credential_name, lookup.error_code or "ERROR")
        return lookup

    # --- read-through -------------------------------------------------------------------------------------------
    @typed_errors
    async def get_or_fetch(
        self,
        name: str,
        ref: str | SecretRef,
        *,
        execution_id: int | None = None,
        session_id: str | None = None,
        scope: str | None = None,
        ttl_seconds: int | None = None,
    ) -> Lookup:
        """Read; on a miss fetch `ref` from Secret Manager, store it and return it.

        Misses of one secret call Secret Manager once, whichever rows they are for: they join the fetch of it in
        flight or just done, in this process (a shared future) or in any other, the warmer's included (the
        reference's advisory lock and the shared table: keychain/fetcher.py). The cache only ever makes a read slower,
        never fail it: while the database cannot be reached the value comes straight from Secret Manager, and a
        value fetched whose row cannot be written is returned all the same (`direct`, logged).
        """
        entry_scope = Scope.of(execution_id=execution_id, session_id=session_id, scope=scope)
        secret_ref = ref if isinstance(ref, SecretRef) else SecretRef.parse(ref)
        return await self._read_through.get_or_fetch(entry_scope.identity(name), entry_scope, secret_ref, ttl_seconds)

    @typed_errors
    async def put(
        self,
        name: str,
        value: Any,
        *,
        execution_id: int | None = None,
        session_id: str | None = None,
        scope: str | None = None,
        ttl_seconds: int | None = None,
        sources: Iterable[Provenance] = (),
    ) -> None:
        entry_scope = Scope.of(execution_id=execution_id, session_id=session_id, scope=scope)
        await self.rows.put_many([Entry(name, entry_scope, value, tuple(sources), ttl_seconds)])


def source_pattern(ref: SecretRef, identity: SecretIdentity) -> str:
    """A `sources` containment pattern for values that came from `ref`: the same secret (its identity when its
    project's number is known, else by the spelling of the reference, which a row records beside Secret Manager's)
    and, for a pinned reference, the same version; a floating reference (latest, an alias) matches floating rows."""
    element: dict[str, Any] = ({"secret": identity.key} if identity.known else {"names": [ref.secret_name]})
    element["pinned"] = ref.pinned
    if ref.pinned:
        element["version"] = ref.version
    return json.dumps([element])


def identity_args(identity: RowIdentity) -> tuple[str, str, str]:
    return identity.credential_name, identity.scope_type, identity.scope_id

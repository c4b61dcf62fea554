"""The Keychain: every database operation on this project's tables (KEYCHAIN_SCHEMA), with encryption, fences and
the read-through (readthrough.py)."""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Awaitable, Callable, Iterable, Sequence, TypeVar

import asyncpg

from . import metrics
from .crypto import KeyRing, new_write_id
from .database import affected, connect_pool, in_durable_transaction, retrying, typed_errors
from .errors import CachedFailure, DecryptionError, InvalidArgument, KeychainError
from .migrate import migrate
from .model import Entry, Lookup, Provenance, RowIdentity, RowToWrite, Scope, sources_json
from .queries import queries
from .reads import ReadCounts
from .readthrough import ReadThrough
from .refs import SecretRef
from .settings import Settings
from .shared import SharedFetches
from .sources import SecretManagerSource, SecretValue

log = logging.getLogger("keychain")


T = TypeVar("T")
# What a worker target does in its own store inside one of the library's transactions; returns its rows changed.
Beside = Callable[[asyncpg.Connection], Awaitable[int]]


# What a batch of writes runs (put_many, write_fenced, existing_rows), with empty arguments (Keychain.prepare_fetching).
_WRITE_STATEMENTS = (("ensure_secret_states", ([],)), ("lock_secret_states", ([],)),
                     ("lock_executions_shared", ([],)), ("finished_among", ([],)), ("existing_rows", ([], [], [], 0.0)),
                     ("put_entries", ([],) * 13))


class Keychain:
    """Owns a connection pool and the key ring. Use `async with Keychain(settings) as kc:` or open()/close()."""

    def __init__(self, settings: Settings, *, source: SecretManagerSource | None = None):
        self.settings = settings
        self.keyring = KeyRing.parse(settings.keys.get_secret_value())
        self.source = source
        self._pool: asyncpg.Pool | None = None
        self._q = queries()
        self._shared = SharedFetches(self)
        self._reads = ReadCounts(self)
        self._read_through = ReadThrough(self)

    # --- lifecycle ----------------------------------------------------------------------------------------------
    @typed_errors
    async def open(self) -> "Keychain":
        if self._pool is None:
            self._pool = await connect_pool(self.settings)
        return self

    @typed_errors
    async def close(self) -> None:
        await self._read_through.close()
        await self._shared.close()
        await self._reads.close()
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
        if self.source is not None:
            await self.source.close()

    async def __aenter__(self) -> "Keychain":
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise KeychainError("the keychain is not open: call `await keychain.open()` first")
        return self._pool

    @typed_errors
    async def migrate(self) -> list[int]:
        async with self.pool.acquire() as conn:
            return await migrate(conn, self.settings.schema_name)

    async def _transaction(self, what: str, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """`work` in a durable transaction (its commit flushed to disk), run again whole if PostgreSQL rolls it back
        for a deadlock or a serialization failure (keychain/database.py)."""
        return await in_durable_transaction(self.pool, what, work)

    async def _statement(self, what: str, name: str, *args: Any) -> str:
        """One statement on its own (autocommit), run again if PostgreSQL rolls it back for a concurrent one."""
        return await retrying(what, lambda: self.pool.execute(self._q[name], *args))

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
            row = await self.pool.fetchrow(self._q["get_entry"], *identity_args(identity))
        else:
            row = await self.pool.fetchrow(self._q["get_entry_from"], *identity_args(identity), source_pattern(ref))
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
        reference's advisory lock and the shared table, see fetch_checked). The cache only ever makes a read slower,
        never fail it: while the database cannot be reached the value comes straight from Secret Manager, and a
        value fetched whose row cannot be written is returned all the same (`direct`, logged).
        """
        entry_scope = Scope.of(execution_id=execution_id, session_id=session_id, scope=scope)
        secret_ref = ref if isinstance(ref, SecretRef) else SecretRef.parse(ref)
        return await self._read_through.get_or_fetch(entry_scope.identity(name), entry_scope, secret_ref, ttl_seconds)

    # --- shared fetches -------------------------------------------------------------------------------------------
    @typed_errors
    async def prepare_fetching(self) -> None:
        """For a process that fetches and writes in bursts (the warmer): connect what a first fetch would otherwise
        connect on its way (the lock connection, the Secret Manager channel), and prepare the write's statements on
        each open pooled connection, so that a burst's first fetches pay only the call and its first writes only the
        write (preparing a statement and looking up its array types cost a burst ~5% of its CPU, pool by pool)."""
        await self._shared.open()
        if self.source is not None:
            await self.source.connect()
        connections = [await self.pool.acquire() for _ in range(self.pool.get_idle_size())]
        try:
            for conn in connections:
                for name, args in _WRITE_STATEMENTS:  # arguments that match and write nothing
                    await conn.execute(self._q[name], *args)
        finally:
            for conn in connections:
                await self.pool.release(conn)

    @typed_errors
    async def fetch_checked(self, ref: SecretRef, *, reuse: bool = True) -> tuple[SecretValue, int] | str:
        """The reference's remembered refusal (its error code), else its value and the secret's generation read
        before it was fetched (a write of it is fenced on that). Checked and fetched once for every caller of this
        process that needs the reference at that moment (read-throughs, warm batches running side by side), so a
        refusal one of them has just recorded is seen by the next instead of asked again; a permanent refusal is
        recorded, then raised. Across processes, one Secret Manager call per reference per
        KEYCHAIN_SHARED_FETCH_SECONDS (keychain/shared.py): a version another process fetched meanwhile (and the
        secret not invalidated since) is taken from the shared table, and a process that needs a reference being
        fetched waits for that fetch. `reuse=False` (keep-warm: a value about to expire) fetches anew, and still
        shares what it fetches."""
        return await self._read_through.fetch_checked(ref, reuse)

    @typed_errors
    async def generations(self, secret_ids: Iterable[str]) -> dict[str, int]:
        """The rotation generation of each secret (0 when never invalidated)."""
        ids = list(secret_ids)
        found = dict(await self.pool.fetch(self._q["secret_generations"], ids))
        return {secret_id: found.get(secret_id, 0) for secret_id in ids}

    # --- write ----------------------------------------------------------------------------------------------------
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
        await self.put_many([Entry(name, entry_scope, value, tuple(sources), ttl_seconds)])

    @typed_errors
    async def put_many(self, entries: list[Entry]) -> list[Entry]:
        """Store entries in one durable statement; idempotent (a repeat overwrites with the same outcome). Of two
        entries for one row, the later is written. Returns the entries NOT written because a secret they hold was
        invalidated after its generation was read."""
        if not entries:
            return []
        # One entry per row (a statement writes a row once), each sealed before any lock is taken.
        latest = {e.identity: e for e in entries}
        sealed = [(e, self._row(e)) for e in latest.values()]

        async def write(conn: asyncpg.Connection) -> list[Entry]:
            stale, fresh = await self._hold_fences(conn, sealed, lambda item: item[0].fences,
                                                    lambda item: item[0].scope.execution_id)
            if fresh:  # put_entries leaves out finished executions' rows itself
                await conn.execute(self._q["put_entries"], *(list(column) for column in zip(*(r for _, r in fresh))))
                metrics.ROWS_WRITTEN.labels("keychain").inc(len(fresh))
            return [e for e, _ in stale]

        return await self._transaction("put_many", write)

    @typed_errors
    async def write_fenced(
        self,
        items: Sequence[T],
        *,
        fences: Callable[[T], Iterable[tuple[str, int]]],
        execution_id: Callable[[T], int | None],
        write: Callable[[asyncpg.Connection, list[T]], Awaitable[None]],
    ) -> list[T]:
        """Write values of secrets somewhere else than this table (a worker target's store) with the same fences
        as put_many: in one durable transaction, in the lock order (sql/queries.sql), hold the rotation fence of each
        item's secrets (`fences`: (secret id, generation read before the fetch)) and the fence of its execution; then
        `write(conn, items)` the items whose secrets were not invalidated meanwhile and whose execution has not
        finished (the target writes its rows and records them as copies, keychain/copies.py, on `conn` or inside
        it). Run again whole on a deadlock or serialization failure. Returns the items NOT written because a secret
        they hold was invalidated after its generation was read."""
        if not items:
            return []

        async def fenced(conn: asyncpg.Connection) -> list[T]:
            stale, fresh = await self._hold_fences(conn, list(items), fences, execution_id)
            execution_ids = sorted({e for e in map(execution_id, fresh) if e is not None})
            if execution_ids:  # put_entries leaves finished executions' rows out itself; another store cannot
                finished = {r["execution_id"] for r in await conn.fetch(self._q["finished_among"], execution_ids)}
                fresh = [item for item in fresh if execution_id(item) not in finished]
            if fresh:
                await write(conn, fresh)
            return stale

        return await self._transaction("write_fenced", fenced)

    async def _hold_fences(self, conn: asyncpg.Connection, items: list[T],
                           fences: Callable[[T], Iterable[tuple[str, int]]],
                           execution_id: Callable[[T], int | None]) -> tuple[list[T], list[T]]:
        """Inside a writer's transaction, in the lock order: the secrets' state rows FOR SHARE (an invalidation
        waits for this transaction, then sees what it wrote), then the executions' fence locks shared (a finish
        waits). Returns (items whose secret was invalidated after its generation was read, the others)."""
        fenced_ids = sorted({secret_id for item in items for secret_id, _ in fences(item)})
        stale: list[T] = []
        if fenced_ids:
            await conn.execute(self._q["ensure_secret_states"], fenced_ids)
            current = dict(await conn.fetch(self._q["lock_secret_states"], fenced_ids))
            stale = [item for item in items if any(current[sid] != gen for sid, gen in fences(item))]
            stale_ids = {id(item) for item in stale}
            items = [item for item in items if id(item) not in stale_ids]
        execution_ids = sorted({e for e in map(execution_id, items) if e is not None})
        if execution_ids:
            await conn.execute(self._q["lock_executions_shared"], execution_ids)
        return stale, items

    def _row(self, e: Entry) -> RowToWrite:
        """An entry as its row: sealed for this write, or a refusal."""
        if e.error_code is None:
            write_id = new_write_id()
            kid, data = self.keyring.seal(e.identity, e.value, write_id)
            state, ttl = "ready", e.ttl_seconds or self.settings.ttl_seconds
        else:
            state, kid, data, write_id = "failed", None, None, None
            ttl = e.ttl_seconds or self.settings.negative_ttl_seconds
        return RowToWrite(e.credential_name, e.credential_type, e.scope.type, e.cache_type, e.scope.execution_id,
                          e.scope.session_id, state, e.error_code, kid, data, write_id, sources_json(e.sources), ttl)

    @typed_errors
    async def existing_rows(
        self, identities: Iterable[RowIdentity], min_remaining_seconds: float = 0
    ) -> dict[RowIdentity, tuple[bool, frozenset[str]]]:
        """For each of these identities that has a row: (ready and outliving `min_remaining_seconds`, the short ids
        of the secrets it holds). Counts no hit."""
        wanted = list(identities)
        if not wanted:
            return {}
        names, scopes, ids = (list(column) for column in zip(*(identity_args(i) for i in wanted)))
        rows = await self.pool.fetch(self._q["existing_rows"], names, scopes, ids, float(min_remaining_seconds))
        return {
            RowIdentity(r["credential_name"], r["scope_type"], r["scope_id"]): (r["ready"], frozenset(r["secret_ids"]))
            for r in rows
        }

    @typed_errors
    async def globals_to_refresh(self, within_seconds: float, limit: int = 1000) -> list[asyncpg.Record]:
        """Global rows read since written that expire within `within_seconds` (this process's reads counted first;
        other processes' within their KEYCHAIN_READ_FLUSH_SECONDS)."""
        await self._reads.flush()
        return await self.pool.fetch(self._q["globals_to_refresh"], float(within_seconds), limit)

    # --- negative cache -------------------------------------------------------------------------------------------
    @typed_errors
    async def active_failures(self, refs: Iterable[str]) -> dict[str, str]:
        """Refusals still remembered, by reference: {ref: error code}."""
        rows = await self.pool.fetch(self._q["active_failures"], list(refs))
        return {row["secret_ref"]: row["error_code"] for row in rows}

    @typed_errors
    async def record_failure(self, ref: str, code: str) -> None:
        await self._transaction("record_failure", lambda conn: conn.execute(
            self._q["record_failure"], ref, code, float(self.settings.negative_ttl_seconds)))

    @typed_errors
    async def delete(
        self, name: str, *, execution_id: int | None = None, session_id: str | None = None, scope: str | None = None
    ) -> int:
        identity = Scope.of(execution_id=execution_id, session_id=session_id, scope=scope).identity(name)
        return affected(await self._transaction(
            "delete", lambda conn: conn.execute(self._q["delete_entry"], *identity_args(identity))))

    @typed_errors
    async def purge_execution(self, execution_id: int) -> int:
        """Delete an execution's rows now; later writes for it are still allowed (see finish_execution)."""
        return affected(await self._transaction(
            "purge_execution", lambda conn: conn.execute(self._q["purge_execution"], execution_id)))

    @typed_errors
    async def finish_execution(self, execution_id: int, *, beside: Beside | None = None) -> int:
        """The execution ended: delete its rows and fence it, so no warm or read-through still in flight, nor a
        redelivered start event, can write rows for it afterwards (nor any `write_fenced`). Idempotent. `beside`:
        what a worker target deletes from its own store, in the same transaction (it returns its rows deleted).
        Returns rows deleted (this table's, and beside's)."""
        purged = 0  # this table's rows, of the attempt that committed

        async def finish(conn: asyncpg.Connection) -> int:
            nonlocal purged
            await conn.execute(self._q["lock_execution"], execution_id)
            purged = await conn.fetchval(self._q["finish_execution"], execution_id)
            return purged + (await beside(conn) if beside is not None else 0)

        total = await self._transaction("finish_execution", finish)
        metrics.PURGED_ROWS.labels("keychain").inc(purged)
        return total

    # --- invalidation ---------------------------------------------------------------------------------------------
    @typed_errors
    async def invalidate(
        self,
        *,
        credential: str | None = None,
        execution_id: int | None = None,
        secret: str | None = None,
        everything: bool = False,
    ) -> int:
        """Stop serving entries (they stay, marked stale, until refreshed, purged or swept). Returns rows changed."""
        chosen = [x for x in (credential, execution_id, secret) if x is not None] + ([True] if everything else [])
        if len(chosen) != 1:
            raise InvalidArgument("invalidate exactly one of: credential, execution_id, secret, everything")
        if secret is not None:
            return await self.invalidate_secret(secret) or 0
        if credential is not None:
            statement, args = "invalidate_credential", (credential,)
        elif execution_id is not None:
            statement, args = "invalidate_execution", (execution_id,)
        else:
            statement, args = "invalidate_all", ()

        async def invalidate(conn: asyncpg.Connection) -> int:
            if everything:
                await conn.execute(self._q["bump_all_generations"])
            return affected(await conn.execute(self._q[statement], *args))

        return await self._transaction("invalidate", invalidate)

    @typed_errors
    async def invalidate_secret(
        self, secret: str | SecretRef, version: str | None = None, *, notice_id: str | None = None, drop: bool = False
    ) -> int | None:
        """THE invalidation: stop serving, at once, every value of this secret, or only of `version` (or of the
        version a pinned reference names), whichever project spelling the rows used; fenced, so no fetch in flight
        writes an older value afterwards. The worker then refreshes running executions' rows (at once when it is the
        worker that invalidates, else on its next maintenance round). Returns rows changed (None: a duplicate)."""
        ref = secret if isinstance(secret, SecretRef) else SecretRef.parse(secret)
        return await self.invalidate_matching(ref.secret, secret_match(ref, version), notice_id=notice_id, drop=drop)

    @typed_errors
    async def stale_secret_ids(self, limit: int = 100) -> list[str]:
        """Secrets that still have rows not served (invalidated, not yet refreshed)."""
        return [row["secret_id"] for row in await self.pool.fetch(self._q["stale_secret_ids"], limit)]

    @typed_errors
    async def invalidate_matching(
        self, secret_id: str, match: dict[str, Any], *, notice_id: str | None = None, drop: bool = False,
        beside: Beside | None = None,
    ) -> int | None:
        """Apply one rotation notice, atomically: bump the secret's generation (fencing in-flight fetches), then
        mark stale (or delete) every row whose sources contain `match`, and forget remembered refusals of the
        secret. `beside`: what a worker target stops serving in its own store, in the same transaction (it returns
        its rows changed). Returns rows changed (this table's and beside's), or None when `notice_id` was applied
        before (a duplicate)."""
        async def invalidate(conn: asyncpg.Connection) -> int | None:  # in the lock order (sql/queries.sql)
            if notice_id is not None and await conn.fetchval(self._q["record_notice"], notice_id) is None:
                return None
            await conn.fetchval(self._q["bump_generation"], secret_id)
            statement = "delete_matching" if drop else "mark_stale_matching"
            pattern = json.dumps([{"secret_id": secret_id, **match}])
            changed = affected(await conn.execute(self._q[statement], pattern))
            if beside is not None:  # a target's rows in its own store: lock order 4, as ours
                changed += await beside(conn)
            await conn.execute(self._q["mark_every_copy_stale_matching"], pattern)  # copies.py
            await conn.execute(self._q["clear_failures_of_secret"], secret_id)
            await conn.execute(self._q["forget_fetches_of_secret"], secret_id)
            if not (match.get("alias") or match.get("pinned")):  # the match reaches rows held through `latest`
                await conn.execute(self._q["forget_latest_held"], secret_id, match.get("version"))
            return changed

        return await self._transaction("invalidate", invalidate)

    @typed_errors
    async def stale_rows(self, secret_id: str, match: dict[str, Any], limit: int = 10_000) -> list[asyncpg.Record]:
        document = json.dumps([{"secret_id": secret_id, **match}])
        return await self.pool.fetch(self._q["stale_rows_matching"], document, limit)

    @typed_errors
    async def latest_secrets_to_check(self, limit: int) -> list[asyncpg.Record]:
        return await self.pool.fetch(self._q["latest_secrets_to_check"], limit)

    @typed_errors
    async def mark_checked(self, secret_id: str) -> None:
        await self._statement("mark_checked", "mark_checked", secret_id)

    # --- maintenance ----------------------------------------------------------------------------------------------
    @typed_errors
    async def sweep(self, batch_size: int | None = None) -> int:
        """Delete expired rows in bounded batches; returns how many."""
        batch = batch_size or self.settings.sweep_batch_size
        total = 0
        while True:
            deleted = affected(await self._statement("sweep", "sweep_expired", batch))
            total += deleted
            metrics.SWEPT_ROWS.labels("keychain").inc(deleted)
            if deleted < batch:
                break
        await self._statement("sweep", "sweep_failures")
        await self._statement("sweep", "sweep_latest_held")
        await self._statement("sweep", "sweep_shared_fetches", float(self.settings.shared_fetch_seconds) * 2)
        await self._statement("sweep", "sweep_fences", float(self.settings.fence_retention_seconds))
        await self._statement("sweep", "sweep_notices", float(self.settings.fence_retention_seconds))
        await self._statement("sweep", "sweep_copies", float(self.settings.fence_retention_seconds), batch)
        return total

    @typed_errors
    async def rekey(self, batch_size: int | None = None) -> tuple[int, int]:
        """Re-encrypt every row under the active key, online. Returns (rows rekeyed, rows that failed to decrypt)."""
        batch = batch_size or self.settings.rekey_batch_size
        active = self.keyring.active_key_id
        last_id, done, failed = 0, 0, 0
        while True:
            rows = await self.pool.fetch(self._q["rekey_candidates"], last_id, active, batch)
            if not rows:
                return done, failed
            ids, kids, datas, write_ids, olds = [], [], [], [], []
            for row in rows:
                identity = RowIdentity(row["credential_name"], row["scope_type"], row["scope_id"])
                try:
                    value = self.keyring.open(identity, row["key_id"], row["data"], row["write_id"])
                except DecryptionError as exc:
                    failed += 1
                    log.warning("rekey skipped row %s: %s", row["id"], exc)
                    continue
                write_id = new_write_id()
                kid, data = self.keyring.seal(identity, value, write_id)
                for column, item in zip((ids, kids, datas, write_ids, olds),
                                        (row["id"], kid, data, write_id, row["data"])):
                    column.append(item)
            if ids:
                done += affected(await self._transaction("rekey", lambda conn: conn.execute(
                    self._q["rekey_rows"], ids, kids, datas, write_ids, olds)))
            last_id = rows[-1]["id"]

    @typed_errors
    async def stats(self) -> list[dict[str, Any]]:
        await self._reads.flush()  # this process's hits included
        return [dict(row) for row in await self.pool.fetch(self._q["stats"])]



def secret_match(ref: SecretRef, version: str | None = None) -> dict[str, Any]:
    """Which rows of `ref`'s secret an invalidation of it reaches (a `sources` element pattern): one version when
    `version` is given or `ref` is pinned, else every row of the secret."""
    version = version or (ref.version if ref.pinned else None)
    return {"version": version} if version else {}


def source_pattern(ref: SecretRef) -> str:
    """A `sources` containment pattern for values that came from `ref`: the same secret (by either project
    spelling, both of which a row records) and, for a pinned reference, the same version; a floating reference
    (latest, an alias) matches floating rows."""
    element: dict[str, Any] = {"names": [ref.secret_name], "pinned": ref.pinned}
    if ref.pinned:
        element["version"] = ref.version
    return json.dumps([element])


def identity_args(identity: RowIdentity) -> tuple[str, str, str]:
    return identity.credential_name, identity.scope_type, identity.scope_id

"""The Keychain: every database operation on `noetl.keychain`, with encryption, read-through and single flight."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable, TypeVar

import asyncpg

from . import metrics
from .crypto import KeyRing, new_write_id
from .errors import (
    CONNECTION_ERRORS, CachedFailure, ConfigurationError, DecryptionError, KeychainError, KeychainUnavailable,
    SecretSourceError,
)
from .migrate import migrate
from .model import Entry, Lookup, Provenance, RowIdentity, RowToWrite, Scope, sources_json, value_from_payload
from .queries import queries
from .reads import ReadCounts
from .refs import SecretRef
from .settings import Settings
from .shared import SharedFetches
from .sources import SecretManagerSource, SecretValue

log = logging.getLogger("keychain")


T = TypeVar("T")


def reports_outage(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Every operation raises KeychainUnavailable, not the driver's errors, while the database cannot be reached."""

    @functools.wraps(method)
    async def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return await method(*args, **kwargs)
        except CONNECTION_ERRORS as exc:
            raise KeychainUnavailable(f"the keychain database cannot be reached ({type(exc).__name__})") from None

    return wrapper


# What a batch of writes runs (Keychain._write, existing_rows), with empty arguments (Keychain.prepare_fetching).
_WRITE_STATEMENTS = (("ensure_secret_states", ([],)), ("lock_secret_states", ([],)),
                     ("lock_executions_shared", ([],)), ("existing_rows", ([], [], [], 0.0)), ("put_entries", ([],) * 13))


class Keychain:
    """Owns a connection pool and the key ring. Use `async with Keychain(settings) as kc:` or open()/close()."""

    def __init__(self, settings: Settings, *, source: SecretManagerSource | None = None):
        self.settings = settings
        self.keyring = KeyRing.parse(settings.keys.get_secret_value())
        self.source = source
        self._pool: asyncpg.Pool | None = None
        self._q = queries()
        self._inflight: dict[tuple[str, str, str], asyncio.Future[Any]] = {}
        self._shared = SharedFetches(self)
        self._reads = ReadCounts(self)
        self._to_write: list[tuple[Entry, asyncio.Future[bool]]] = []  # read-throughs' rows (_write_together)
        self._writer: asyncio.Future[None] | None = None

    # --- lifecycle ----------------------------------------------------------------------------------------------
    @reports_outage
    async def open(self) -> "Keychain":
        if self._pool is None:
            self._pool = await connect_pool(self.settings)
        return self

    async def close(self) -> None:
        # Fetches still in flight (their callers gone) stop, and rows being written are written, while the pool is open.
        pending = [future for future in self._inflight.values() if not future.done()]
        for future in pending:
            future.cancel()
        await asyncio.gather(*pending, *([self._writer] if self._writer else []), return_exceptions=True)
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

    @reports_outage
    async def migrate(self) -> list[int]:
        async with self.pool.acquire() as conn:
            return await migrate(conn, self.settings.schema_name)

    @asynccontextmanager
    async def _durable(self) -> AsyncIterator[asyncpg.Connection]:
        """A transaction whose commit is flushed to disk (the pool commits asynchronously for read bookkeeping)."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(self._q["durable_commit"])
            yield conn

    # --- read -----------------------------------------------------------------------------------------------------
    @reports_outage
    async def get(
        self, name: str, *, execution_id: int | None = None, session_id: str | None = None, scope: str | None = None
    ) -> Lookup:
        """Read one entry in one statement, hit or miss. Raises CachedFailure for a remembered refusal."""
        identity = Scope.of(execution_id=execution_id, session_id=session_id, scope=scope).identity(name)
        return await self._lookup(identity)

    @reports_outage
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
        reference's advisory lock and the shared table, see fetch_checked).
        """
        entry_scope = Scope.of(execution_id=execution_id, session_id=session_id, scope=scope)
        identity = entry_scope.identity(name)
        secret_ref = ref if isinstance(ref, SecretRef) else SecretRef.parse(ref)
        try:
            lookup = await self._lookup(identity, secret_ref)
            if lookup:
                return lookup
            return await self._single_flight(
                (identity.credential_name, identity.scope_type, identity.scope_id),
                lambda: self._read_through(identity, entry_scope, secret_ref, ttl_seconds),
            )
        except (KeychainUnavailable, *CONNECTION_ERRORS):
            # The cache is down: the execution must only get slower, not fail. Nothing is written.
            return await self._single_flight(("", "direct", str(secret_ref)), lambda: self._fetch_direct(secret_ref))

    async def _fetch_direct(self, ref: SecretRef) -> Lookup:
        if self.source is None:
            raise KeychainUnavailable("the keychain database cannot be reached, and there is no Secret Manager source")
        secret = await self.source.access(ref)
        metrics.READ_OUTCOMES["direct"].inc()
        log.warning("keychain unavailable: served %s straight from Secret Manager", ref.secret_name)
        return Lookup("direct", value_from_payload(secret.payload))

    async def _single_flight(self, key: tuple[str, str, str], make: Callable[[], Awaitable[T]]) -> T:
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
        """Fetch the reference, shared with every fetch of it in flight or just done (in this process and in any
        other: the warmer's, another reader's), then write the row in a short transaction, fenced by the secret's
        generation: fetched again (three times at most) only if the secret was invalidated meanwhile. No connection
        is held while waiting for a fetch another caller in this process makes. A permanent refusal is recorded (the
        next reads get CachedFailure) and raised."""
        for _ in range(3):
            fetched = await self.fetch_checked(ref)
            if isinstance(fetched, str):
                raise CachedFailure(identity.credential_name, fetched)
            secret, generation = fetched
            entry = Entry(identity.credential_name, scope, value_from_payload(secret.payload),
                          sources=(Provenance(ref, secret.version_name),), ttl_seconds=ttl_seconds,
                          fences=((ref.secret, generation),))
            if await self._write_together(entry):
                return Lookup("hit", entry.value)
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
            batch = [(e.scope.identity(e.credential_name), e, written) for e, written in self._to_write]
            self._to_write = []
            latest = {identity: e for identity, e, _ in batch}  # a statement writes a row once
            try:
                fenced = await self.put_many(list(latest.values()))
            except Exception as exc:
                for _, _, written in batch:
                    if not written.done():
                        written.set_exception(exc)
                continue
            for identity, _, written in batch:
                if not written.done():
                    written.set_result(latest[identity] not in fenced)

    # --- shared fetches -------------------------------------------------------------------------------------------
    @reports_outage
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

    @reports_outage
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

        async def check_then_fetch() -> tuple[SecretValue, int] | str:
            failure = await self.pool.fetchrow(self._q["active_failures"], [str(ref)])
            if failure is not None:
                return failure["error_code"]
            try:
                return await self._shared.fetch(ref, reuse=reuse)
            except SecretSourceError as exc:
                if exc.permanent:
                    await self.record_failure(str(ref), exc.code)
                raise

        return await self._single_flight(("", "checked" if reuse else "checked anew", str(ref)), check_then_fetch)

    @reports_outage
    async def generations(self, secret_ids: Iterable[str]) -> dict[str, int]:
        """The rotation generation of each secret (0 when never invalidated)."""
        ids = list(secret_ids)
        found = dict(await self.pool.fetch(self._q["secret_generations"], ids))
        return {secret_id: found.get(secret_id, 0) for secret_id in ids}

    # --- write ----------------------------------------------------------------------------------------------------
    @reports_outage
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

    @reports_outage
    async def put_many(self, entries: list[Entry]) -> list[Entry]:
        """Store entries in one durable statement; idempotent (a repeat overwrites with the same outcome).
        Returns the entries NOT written because a secret they hold was invalidated after its generation was read."""
        if not entries:
            return []
        async with self._durable() as conn:
            return await self._write(conn, entries)

    async def _write(self, conn: asyncpg.Connection, entries: list[Entry]) -> list[Entry]:
        """Inside a transaction: hold the rotation and execution fences, then upsert the entries in one statement."""
        fenced_ids = sorted({secret_id for e in entries for secret_id, _ in e.fences})
        stale: list[Entry] = []
        if fenced_ids:
            await conn.execute(self._q["ensure_secret_states"], fenced_ids)
            current = dict(await conn.fetch(self._q["lock_secret_states"], fenced_ids))
            stale = [e for e in entries if any(current[sid] != gen for sid, gen in e.fences)]
            entries = [e for e in entries if e not in stale]
        rows = [self._row(e) for e in entries]
        execution_ids = [e.scope.execution_id for e in entries if e.scope.execution_id is not None]
        if execution_ids:
            await conn.execute(self._q["lock_executions_shared"], execution_ids)
        if entries:
            await conn.execute(self._q["put_entries"], *(list(column) for column in zip(*rows)))
            metrics.ROWS_WRITTEN.inc(len(entries))
        return stale

    def _row(self, e: Entry) -> RowToWrite:
        """An entry as its row: sealed for this write, or a refusal."""
        if e.error_code is None:
            write_id = new_write_id()
            kid, data = self.keyring.seal(e.scope.identity(e.credential_name), e.value, write_id)
            state, ttl = "ready", e.ttl_seconds or self.settings.ttl_seconds
        else:
            state, kid, data, write_id = "failed", None, None, None
            ttl = e.ttl_seconds or self.settings.negative_ttl_seconds
        return RowToWrite(e.credential_name, e.credential_type, e.scope.type, e.cache_type, e.scope.execution_id,
                          e.scope.session_id, state, e.error_code, kid, data, write_id, sources_json(e.sources), ttl)

    @reports_outage
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

    @reports_outage
    async def globals_to_refresh(self, within_seconds: float, limit: int = 1000) -> list[asyncpg.Record]:
        """Global rows read since written that expire within `within_seconds` (this process's reads counted first;
        other processes' within their KEYCHAIN_READ_FLUSH_SECONDS)."""
        await self._reads.flush()
        return await self.pool.fetch(self._q["globals_to_refresh"], float(within_seconds), limit)

    # --- negative cache -------------------------------------------------------------------------------------------
    @reports_outage
    async def active_failures(self, refs: Iterable[str]) -> dict[str, str]:
        """Refusals still remembered, by reference: {ref: error code}."""
        rows = await self.pool.fetch(self._q["active_failures"], list(refs))
        return {row["secret_ref"]: row["error_code"] for row in rows}

    @reports_outage
    async def record_failure(self, ref: str, code: str) -> None:
        async with self._durable() as conn:
            await conn.execute(self._q["record_failure"], ref, code, float(self.settings.negative_ttl_seconds))

    @reports_outage
    async def delete(
        self, name: str, *, execution_id: int | None = None, session_id: str | None = None, scope: str | None = None
    ) -> int:
        identity = Scope.of(execution_id=execution_id, session_id=session_id, scope=scope).identity(name)
        async with self._durable() as conn:
            return affected(await conn.execute(self._q["delete_entry"], *identity_args(identity)))

    @reports_outage
    async def purge_execution(self, execution_id: int) -> int:
        """Delete an execution's rows now; later writes for it are still allowed (see finish_execution)."""
        async with self._durable() as conn:
            return affected(await conn.execute(self._q["purge_execution"], execution_id))

    @reports_outage
    async def finish_execution(self, execution_id: int) -> int:
        """The execution ended: delete its rows and fence it, so no warm or read-through still in flight, nor a
        redelivered start event, can write rows for it afterwards. Idempotent. Returns rows deleted."""
        async with self._durable() as conn:
            await conn.execute(self._q["lock_execution"], execution_id)
            purged = await conn.fetchval(self._q["finish_execution"], execution_id)
        metrics.PURGED_ROWS.inc(purged)
        return purged

    # --- invalidation ---------------------------------------------------------------------------------------------
    @reports_outage
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
            raise ValueError("invalidate exactly one of: credential, execution_id, secret, everything")
        if secret is not None:
            return await self.invalidate_secret(secret) or 0
        if credential is not None:
            statement, args = "invalidate_credential", (credential,)
        elif execution_id is not None:
            statement, args = "invalidate_execution", (execution_id,)
        else:
            statement, args = "invalidate_all", ()
        async with self._durable() as conn:
            if everything:
                await conn.execute(self._q["bump_all_generations"])
            return affected(await conn.execute(self._q[statement], *args))

    @reports_outage
    async def invalidate_secret(
        self, secret: str | SecretRef, version: str | None = None, *, notice_id: str | None = None, drop: bool = False
    ) -> int | None:
        """THE invalidation: stop serving, at once, every value of this secret, or only of `version` (or of the
        version a pinned reference names), whichever project spelling the rows used; fenced, so no fetch in flight
        writes an older value afterwards. The worker then refreshes running executions' rows (at once when it is the
        worker that invalidates, else on its next maintenance round). Returns rows changed (None: a duplicate)."""
        ref = secret if isinstance(secret, SecretRef) else SecretRef.parse(secret)
        return await self.invalidate_matching(ref.secret, secret_match(ref, version), notice_id=notice_id, drop=drop)

    @reports_outage
    async def stale_secret_ids(self, limit: int = 100) -> list[str]:
        """Secrets that still have rows not served (invalidated, not yet refreshed)."""
        return [row["secret_id"] for row in await self.pool.fetch(self._q["stale_secret_ids"], limit)]

    @reports_outage
    async def invalidate_matching(
        self, secret_id: str, match: dict[str, Any], *, notice_id: str | None = None, drop: bool = False
    ) -> int | None:
        """Apply one rotation notice, atomically: bump the secret's generation (fencing in-flight fetches), then
        mark stale (or delete) every row whose sources contain `match`, and forget remembered refusals of the
        secret. Returns rows changed, or None when `notice_id` was applied before (a duplicate)."""
        async with self._durable() as conn:
            if notice_id is not None and await conn.fetchval(self._q["record_notice"], notice_id) is None:
                return None
            await conn.fetchval(self._q["bump_generation"], secret_id)
            statement = "delete_matching" if drop else "mark_stale_matching"
            changed = affected(await conn.execute(self._q[statement], json.dumps([{"secret_id": secret_id, **match}])))
            await conn.execute(self._q["clear_failures_of_secret"], secret_id)
            await conn.execute(self._q["forget_fetches_of_secret"], secret_id)
            if not (match.get("alias") or match.get("pinned")):  # the match reaches rows held through `latest`
                await conn.execute(self._q["forget_latest_held"], secret_id, match.get("version"))
            return changed

    @reports_outage
    async def stale_rows(self, secret_id: str, match: dict[str, Any], limit: int = 10_000) -> list[asyncpg.Record]:
        document = json.dumps([{"secret_id": secret_id, **match}])
        return await self.pool.fetch(self._q["stale_rows_matching"], document, limit)

    @reports_outage
    async def latest_secrets_to_check(self, limit: int) -> list[asyncpg.Record]:
        return await self.pool.fetch(self._q["latest_secrets_to_check"], limit)

    @reports_outage
    async def mark_checked(self, secret_id: str) -> None:
        await self.pool.execute(self._q["mark_checked"], secret_id)

    # --- maintenance ----------------------------------------------------------------------------------------------
    @reports_outage
    async def sweep(self, batch_size: int | None = None) -> int:
        """Delete expired rows in bounded batches; returns how many."""
        batch = batch_size or self.settings.sweep_batch_size
        total = 0
        while True:
            deleted = affected(await self.pool.execute(self._q["sweep_expired"], batch))
            total += deleted
            metrics.SWEPT_ROWS.inc(deleted)
            if deleted < batch:
                break
        await self.pool.execute(self._q["sweep_failures"])
        await self.pool.execute(self._q["sweep_latest_held"])
        await self.pool.execute(self._q["sweep_shared_fetches"], float(self.settings.shared_fetch_seconds) * 2)
        await self.pool.execute(self._q["sweep_fences"], float(self.settings.fence_retention_seconds))
        await self.pool.execute(self._q["sweep_notices"], float(self.settings.fence_retention_seconds))
        return total

    @reports_outage
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
                async with self._durable() as conn:
                    done += affected(await conn.execute(self._q["rekey_rows"], ids, kids, datas, write_ids, olds))
            last_id = rows[-1]["id"]

    @reports_outage
    async def stats(self) -> list[dict[str, Any]]:
        await self._reads.flush()  # this process's hits included
        return [dict(row) for row in await self.pool.fetch(self._q["stats"])]


async def connect_pool(settings: Settings) -> asyncpg.Pool:
    try:
        return await asyncpg.create_pool(
            settings.dsn,
            min_size=settings.pool_min_size,
            max_size=settings.pool_max_size,
            server_settings={
                "search_path": settings.schema_name,
                # Hit bookkeeping is statistics: not worth an fsync per read. Writes turn it back on (_durable).
                "synchronous_commit": "off",
                "application_name": "keychain",
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


def affected(status: str) -> int:
    """Row count from a command status such as 'DELETE 3' or 'UPDATE 0'."""
    return int(status.rsplit(" ", 1)[-1])

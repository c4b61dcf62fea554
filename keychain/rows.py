"""Writing rows: the keychain's own (put_many) and a worker target's in its own store (write_fenced), both fenced the
same way, in one durable transaction each, in the lock order (sql/queries.sql)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Awaitable, Callable, Generic, Iterable, Sequence, TypeVar

import asyncpg

from . import metrics
from .crypto import KeyRing, new_write_id
from .database import Connector, typed_errors
from .model import Entry, RowIdentity, RowToWrite, held_of, sources_json

T = TypeVar("T")


@dataclass(frozen=True)
class Written(Generic[T]):
    """What a write did with each item it was given: written; fenced (a secret it holds was invalidated after its
    generation was read: fetch it again); failed (not written, for a reason that may pass: try again later); skipped
    (what the store does not keep, such as a refusal in a store that records none)."""

    written: list[T]
    fenced: list[T]
    failed: list[T]
    skipped: list[T] = field(default_factory=list)


class Rows:
    def __init__(self, connector: Connector, keyring: KeyRing):
        self._db = connector
        self._keyring = keyring

    @typed_errors
    async def put_many(self, entries: Sequence[Entry]) -> list[Entry]:
        """Store entries in one durable statement; idempotent (a repeat overwrites with the same outcome). Of two
        entries for one row, the later is written. Returns the entries NOT written because a secret they hold was
        invalidated after its generation was read."""
        if not entries:
            return []
        # One entry per row (a statement writes a row once), each sealed before any lock is taken.
        latest = {e.identity: e for e in entries}
        sealed = [(e, self._row(e)) for e in latest.values()]
        written = 0  # rows the statement wrote, in the attempt that committed

        async def write(conn: asyncpg.Connection) -> list[Entry]:
            nonlocal written
            stale, fresh = await self._hold_fences(conn, sealed, lambda item: item[0].fences,
                                                    lambda item: item[0].scope.execution_id)
            written = 0
            if fresh:  # put_entries leaves out finished executions' rows itself
                written = await conn.fetchval(self._db.q["put_entries"],
                                              *(list(column) for column in zip(*(r for _, r in fresh))))
            return [e for e, _ in stale]

        fenced = await self._db.transaction("put_many", write)
        metrics.ROWS_WRITTEN.labels("keychain").inc(written)  # counted once committed: never a retried attempt twice
        return fenced

    @typed_errors
    async def write_fenced(
        self,
        items: Sequence[T],
        *,
        fences: Callable[[T], Iterable[tuple[str, int]]],
        execution_id: Callable[[T], int | None],
        write: Callable[[asyncpg.Connection, list[T]], Awaitable[None]],
        target: str,
    ) -> list[T]:
        """Write values of secrets somewhere else than this table (a worker target's store) with the same fences
        as put_many: in one durable transaction, in the lock order, hold the rotation fence of each item's secrets
        (`fences`: (the secret's identity key, its generation read before the fetch)) and the fence of its execution; then
        `write(conn, items)` the items whose secrets were not invalidated meanwhile and whose execution has not
        finished (the target writes its rows and records them as copies, keychain/copies.py). Returns the items NOT
        written because a secret they hold was invalidated after its generation was read. The rows written are
        counted (`keychain_rows_written_total{target}`) once the transaction has committed."""
        if not items:
            return []
        written = 0  # of the attempt that committed

        async def fenced(conn: asyncpg.Connection) -> list[T]:
            nonlocal written
            written = 0
            stale, fresh = await self._hold_fences(conn, list(items), fences, execution_id)
            execution_ids = sorted({e for e in map(execution_id, fresh) if e is not None})
            if execution_ids:  # put_entries leaves finished executions' rows out itself; another store cannot
                finished = {r["execution_id"] for r in await conn.fetch(self._db.q["finished_among"], execution_ids)}
                fresh = [item for item in fresh if execution_id(item) not in finished]
            if fresh:
                await write(conn, fresh)
                written = len(fresh)
            return stale

        stale = await self._db.transaction("write_fenced", fenced)
        metrics.ROWS_WRITTEN.labels(target).inc(written)
        return stale

    async def _hold_fences(self, conn: asyncpg.Connection, items: list[T],
                           fences: Callable[[T], Iterable[tuple[str, int]]],
                           execution_id: Callable[[T], int | None]) -> tuple[list[T], list[T]]:
        """Inside a writer's transaction, in the lock order: the secrets' state rows FOR SHARE (an invalidation
        waits for this transaction, then sees what it wrote), then the executions' fence locks shared (a finish
        waits). Every (identity, generation) pair of an item is checked: two values of one secret fetched at two
        moments are two pairs. Returns (items whose secret was invalidated after its generation was read, the
        others)."""
        fenced_ids = sorted({secret_id for item in items for secret_id, _ in fences(item)})
        stale: list[T] = []
        if fenced_ids:
            await conn.execute(self._db.q["ensure_secret_states"], fenced_ids)
            current = dict(await conn.fetch(self._db.q["lock_secret_states"], fenced_ids))
            stale = [item for item in items if any(current[sid] != gen for sid, gen in fences(item))]
            stale_ids = {id(item) for item in stale}
            items = [item for item in items if id(item) not in stale_ids]
        execution_ids = sorted({e for e in map(execution_id, items) if e is not None})
        if execution_ids:
            await conn.execute(self._db.q["lock_executions_shared"], execution_ids)
        return stale, items

    def _row(self, e: Entry) -> RowToWrite:
        """An entry as its row: sealed for this write, or a refusal."""
        settings = self._db.settings
        if e.error_code is None:
            write_id = new_write_id()
            kid, data = self._keyring.seal(e.identity, e.value, write_id)
            state, ttl = "ready", e.ttl_seconds or settings.ttl_seconds
        else:
            state, kid, data, write_id = "failed", None, None, None
            ttl = e.ttl_seconds or settings.negative_ttl_seconds
        return RowToWrite(e.credential_name, e.credential_type, e.scope.type, e.cache_type, e.scope.execution_id,
                          e.scope.session_id, state, e.error_code, kid, data, write_id, sources_json(e.sources), ttl)

    @typed_errors
    async def existing(
        self, identities: Iterable[RowIdentity], min_remaining_seconds: float = 0
    ) -> dict[RowIdentity, tuple[bool, frozenset[str]]]:
        """For each of these identities that has a row: (ready and outliving `min_remaining_seconds`, what it holds:
        model.held_of). Counts no hit."""
        wanted = list(identities)
        if not wanted:
            return {}
        names, scopes, ids = (list(column) for column in zip(*wanted))
        rows = await self._db.fetch("existing_rows", names, scopes, ids, float(min_remaining_seconds))
        return {
            RowIdentity(r["credential_name"], r["scope_type"], r["scope_id"]): (r["ready"], held_of(r["sources"]))
            for r in rows
        }

    @typed_errors
    async def prepare(self) -> None:
        """For a process that writes in bursts (the warmer): prepare the writes' statements on each open pooled
        connection, with arguments that match and write nothing, so that a burst's first writes pay only the write
        (preparing a statement and looking up its array types cost a burst ~5% of its CPU, pool by pool)."""
        pool = self._db.pool
        connections = [await pool.acquire() for _ in range(pool.get_idle_size())]
        try:
            for conn in connections:
                for name, args in _WRITE_STATEMENTS:
                    await conn.execute(self._db.q[name], *args)
        finally:
            for conn in connections:
                await pool.release(conn)


# What a batch of writes runs (put_many, write_fenced, existing), with empty arguments (Rows.prepare).
_WRITE_STATEMENTS = (("ensure_secret_states", ([],)), ("lock_secret_states", ([],)),
                     ("lock_executions_shared", ([],)), ("finished_among", ([],)), ("existing_rows", ([], [], [], 0.0)),
                     ("put_entries", ([],) * 13))

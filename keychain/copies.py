"""Copies: secrets' values a worker target wrote into another store, recorded beside the keychain (migration 0009).

The library knows nothing of the other store's format. A target (one of the stream worker's) writes its
rows inside `Rows.write_fenced` and records each as a copy: its key in that store, the sources it came from (as
keychain rows record them: Provenance.as_json), its execution, and what the target needs to write it again. Then a
rotation (`Maintenance.invalidate(beside=...)`) finds every copy of the secret in the same transaction as the
keychain's own rows, a re-warm lists the stale ones, and a purge or a sweep of the other store tells the copies the
warmer wrote from the rows written by someone else. Every method takes the connection of the transaction it is part
of, and follows the lock order (sql/queries.sql).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable

import asyncpg

from .database import durable_transaction, typed_errors
from .model import Provenance, held_of, sources_json
from .queries import queries
from .refs import SecretIdentity


@dataclass(frozen=True)
class Copy:
    """One copy to record."""

    key: str
    sources: tuple[Provenance, ...]
    ttl_seconds: float
    execution_id: int | None = None
    parent_execution_id: int | None = None
    detail: dict[str, Any] | None = None
    credential_name: str | None = None  # the entry's name in the target's store (an operator invalidates by it)


@dataclass(frozen=True)
class StaleCopy:
    key: str
    execution_id: int | None
    parent_execution_id: int | None
    sources: list[dict[str, Any]]
    detail: dict[str, Any]


class Copies:
    """The copies of one target (its name is the `target` column)."""

    def __init__(self, target: str):
        self.target = target
        self._q = queries()

    async def record(self, conn: asyncpg.Connection, copies: Iterable[Copy]) -> None:
        copies = list(copies)
        if not copies:
            return
        await conn.execute(
            self._q["record_copies"], self.target, [c.key for c in copies], [c.execution_id for c in copies],
            [c.parent_execution_id for c in copies], [sources_json(c.sources) for c in copies],
            [len(c.sources) for c in copies], [json.dumps(c.detail or {}) for c in copies],
            [float(c.ttl_seconds) for c in copies], [c.credential_name for c in copies])

    @typed_errors
    async def record_before(self, pool: asyncpg.Pool, copies: Iterable[Copy]) -> None:
        """Copies recorded on their own, durably, before the target writes their rows: for a store written by calls
        that may fail partway (NoETL's API), so that whatever reached the store is found by a rotation."""
        async with durable_transaction(pool) as conn:
            await self.record(conn, copies)

    async def of(self, conn: asyncpg.Connection | asyncpg.Pool, keys: list[str]) -> dict[str, tuple[bool, frozenset[str]]]:
        """For each key that has a copy: (ready, what it holds: model.held_of)."""
        rows = await conn.fetch(self._q["copies_of"], self.target, keys) if keys else []
        return {r["copy_key"]: (r["ready"], held_of(r["sources"])) for r in rows}

    async def of_children(self, conn: asyncpg.Connection | asyncpg.Pool, parent_execution_id: int) -> list[str]:
        """The keys of the copies written for executions this one started."""
        return [r["copy_key"] for r in await conn.fetch(self._q["copies_of_children"], self.target,
                                                         parent_execution_id)]

    async def matching(self, conn: asyncpg.Connection, patterns: list[dict[str, Any]]) -> list[str]:
        """The keys of the copies matching any pattern, without locking them, for the target to lock and stop serving
        its rows first (lock order 4) before `mark_stale` or `forget` takes the copies (lock order 5). A copy written
        after this read holds a value fetched after the invalidation committed (fenced by its generation): it needs
        no stopping."""
        rows = await conn.fetch(self._q["copies_matching"], self.target, [json.dumps([p]) for p in patterns])
        return [r["copy_key"] for r in rows]

    async def mark_stale(self, conn: asyncpg.Connection, keys: list[str]) -> None:
        """The copies under these keys stop being ready (the target stopped serving their rows)."""
        if keys:
            await conn.execute(self._q["mark_copies_stale"], self.target, keys)

    async def stale(self, pool: asyncpg.Pool, patterns: list[dict[str, Any]], limit: int = 10_000) -> list[StaleCopy]:
        rows = await pool.fetch(self._q["stale_copies"], self.target, [json.dumps([p]) for p in patterns], limit)
        return [StaleCopy(r["copy_key"], r["execution_id"], r["parent_execution_id"], json.loads(r["sources"]),
                          json.loads(r["detail"])) for r in rows]

    async def stale_secrets(self, pool: asyncpg.Pool, limit: int = 100) -> list[SecretIdentity]:
        return [SecretIdentity.from_key(r["secret"])
                for r in await pool.fetch(self._q["stale_copy_secrets"], self.target, limit)]

    async def forget(self, conn: asyncpg.Connection | asyncpg.Pool, keys: list[str]
                     ) -> dict[str, tuple[int, dict[str, Any]]]:
        """The copies of rows the target deleted from its store: forgotten; returns {key: (values it held, its
        detail)}."""
        rows = await conn.fetch(self._q["forget_copies"], self.target, keys) if keys else []
        return {r["copy_key"]: (r["fields"], json.loads(r["detail"])) for r in rows}

    async def details(self, conn: asyncpg.Connection | asyncpg.Pool, keys: list[str]
                      ) -> dict[str, tuple[list[dict[str, Any]], dict[str, Any]]]:
        """The copies under these keys: {key: (their sources, their detail)}."""
        rows = await conn.fetch(self._q["copy_details"], self.target, keys) if keys else []
        return {r["copy_key"]: (json.loads(r["sources"]), json.loads(r["detail"])) for r in rows}

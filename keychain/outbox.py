"""The outbox: what a worker target with a store of its own (NoETL's keychain) must still apply of an invalidation
(migration 0012). `Maintenance.invalidate(defer=...)` records an entry per such target in the same transaction that
stops our own rows being served, so our rows never wait for another store; the target then applies its entries
(`apply`), each in a transaction of its own that also removes the entry, in order per `ordering`, with its own
retries (`failed`). The library knows nothing of the target's store: `work` is the target's to read."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import asyncpg

from .database import Connector, typed_errors


@dataclass(frozen=True)
class OutboxEntry:
    id: int
    work: dict[str, Any]
    ordering: str
    attempts: int


@dataclass(frozen=True)
class OutboxCounts:
    waiting: int  # entries not applied yet
    refused: int  # of which the target refused for good (alerting)
    next_due_seconds: float  # until the first of them is due again (0 or less: due now)


class Outbox:
    def __init__(self, connector: Connector):
        self._db = connector

    async def add(self, conn: asyncpg.Connection, targets: list[str], work: dict[str, Any], ordering: str) -> None:
        """Inside the caller's transaction: `work` for each of these targets."""
        if targets:
            await conn.execute(self._db.q["add_to_outbox"], targets, json.dumps(work), ordering)

    @typed_errors
    async def due(self, target: str, limit: int = 100) -> list[OutboxEntry]:
        rows = await self._db.fetch("outbox_due", target, limit)
        return [OutboxEntry(r["id"], json.loads(r["work"]), r["ordering"], r["attempts"]) for r in rows]

    @typed_errors
    async def apply(self, entry: OutboxEntry, work: Callable[[asyncpg.Connection], Awaitable[int]]) -> int | None:
        """`work` (the target's own writes) in one durable transaction that first claims the entry and last removes
        it: applied once, or not at all. None when another process holds the entry (it is applying it)."""

        async def applied(conn: asyncpg.Connection) -> int | None:
            if await conn.fetchval(self._db.q["claim_outbox_entry"], entry.id) is None:
                return None
            changed = await work(conn)
            await conn.execute(self._db.q["outbox_entry_done"], entry.id)
            return changed

        return await self._db.transaction("apply_outbox", applied)

    @typed_errors
    async def failed(self, entry: OutboxEntry, *, retry_in: float, reason: str, permanent: bool) -> None:
        await self._db.statement("outbox_failed", "outbox_entry_failed", entry.id, float(retry_in), reason, permanent)

    @typed_errors
    async def counts(self) -> dict[str, OutboxCounts]:
        return {r["target"]: OutboxCounts(r["waiting"], r["refused"], r["next_due_seconds"])
                for r in await self._db.fetch("outbox_counts")}

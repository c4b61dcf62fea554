"""The maintenance API, for the stream worker and the CLI: an execution's end, invalidation, the sweep, rekeying,
statistics, and what re-warming and reconciliation read. A Keychain holds one (`keychain.maintenance`), on the same
connection pool, fetcher and read counts; readers never need it."""

from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable, Iterable

import asyncpg

from . import metrics
from .crypto import KeyRing, new_write_id
from .database import Connector, affected, typed_errors
from .errors import DecryptionError
from .fetcher import Fetcher
from .invalidation import Selection
from .model import RowIdentity
from .outbox import Outbox
from .projects import ProjectNumbers
from .reads import ReadCounts
from .refs import SecretIdentity

log = logging.getLogger("keychain")

# What a worker target does in its own store inside one of the library's transactions; returns its rows changed.
Beside = Callable[[asyncpg.Connection], Awaitable[int]]

SWEEP_BATCH_SIZE = 5000  # expired rows deleted per statement: short locks, few round trips
REKEY_BATCH_SIZE = 500  # rows re-encrypted per transaction
# How long a finished execution stays fenced against late writes (and applied notices, and copies whose rows someone
# else removed, are remembered): longer than any redelivery.
FENCE_RETENTION_SECONDS = 7 * 86400

# Our rows an invalidation reaches, by kind: (statement, its arguments).
_MARK_STALE = {
    "credential": lambda s: ("invalidate_credential", s.credential),
    "execution": lambda s: ("invalidate_execution", s.execution_id),
    "everything": lambda s: ("invalidate_all",),
}


class Maintenance:
    def __init__(self, connector: Connector, keyring: KeyRing, fetcher: Fetcher, reads: ReadCounts,
                 projects: ProjectNumbers):
        self.outbox = Outbox(connector)
        self._db = connector
        self._keyring = keyring
        self._fetcher = fetcher
        self._reads = reads
        self._projects = projects

    # --- an execution's end -----------------------------------------------------------------------------------------
    @typed_errors
    async def finish_execution(self, execution_id: int, *, beside: Beside | None = None) -> int:
        """The execution ended: delete its rows and fence it, so no warm or read-through still in flight, nor a
        redelivered start event, can write rows for it afterwards (nor any `write_fenced`). Idempotent. `beside`:
        what a worker target deletes from its own store, in the same transaction (it returns its rows deleted).
        Returns rows deleted (this table's, and beside's)."""
        purged = 0  # this table's rows, of the attempt that committed

        async def finish(conn: asyncpg.Connection) -> int:
            nonlocal purged
            await conn.execute(self._db.q["lock_execution"], execution_id)
            purged = await conn.fetchval(self._db.q["finish_execution"], execution_id)
            return purged + (await beside(conn) if beside is not None else 0)

        total = await self._db.transaction("finish_execution", finish)
        metrics.PURGED_ROWS.labels("keychain").inc(purged)
        return total

    # --- invalidation -----------------------------------------------------------------------------------------------
    @typed_errors
    async def resolve(self, selection: Selection) -> Selection:
        """A selection naming a secret's project by id, with the project's number if any process has learned it;
        else reaching that secret id and location in every project (an id cannot be told from another's number)."""
        if selection.named is None:
            return selection
        identity = await self._projects.identity(selection.named)
        return selection.resolved(identity.project if identity.known else None)

    @typed_errors
    async def invalidate(self, selection: Selection, *, notice_id: str | None = None, drop: bool = False,
                         defer: list[str] | None = None) -> int | None:
        """THE invalidation, atomically, in the lock order: the selected rows stop being served at once (marked
        stale; deleted with `drop`, for a secret's), and what the worker targets named by `defer` must still do in
        their own stores is recorded in the outbox (keychain/outbox.py) in the same transaction: our rows never wait
        for another store. Whatever it selects, the secrets it reaches are fenced and fetched anew: their
        generations move on (no fetch in flight writes an older value afterwards) and their shared fetches and
        refusals are forgotten. A secret's invalidation with nothing deferred marks every target's copies of it
        stale (the CLI's door); `everything` moves every generation on. Returns our rows changed, or None when
        `notice_id` was applied before (a duplicate)."""
        selection = await self.resolve(selection)
        reached: list[str] = []  # the secrets' identities, of the attempt that committed

        async def invalidate(conn: asyncpg.Connection) -> int | None:
            nonlocal reached
            q = self._db.q
            if notice_id is not None and await conn.fetchval(q["record_notice"], notice_id) is None:
                return None
            path = selection.any_project_path
            if selection.kind == "everything":
                await conn.execute(q["bump_all_generations"])
            else:
                reached = selection.secrets if selection.kind == "secret" else sorted({
                    key for row in await conn.fetch(q["secrets_held_by"], selection.credential, selection.execution_id)
                    for key in SecretIdentity.from_key(row["secret"]).reached_keys})
                await conn.execute(q["bump_generations"], reached, path)  # lock order 2, before any row
            if selection.kind == "secret":
                statement, *args = ("delete_matching" if drop else "mark_stale_matching", selection.sources_patterns)
            else:
                statement, *args = _MARK_STALE[selection.kind](selection)
            changed = affected(await conn.execute(q[statement], *args))
            if defer:  # lock order 5: new rows
                await self.outbox.add(conn, sorted(defer), {"selection": selection.as_json(), "drop": drop},
                                      selection.ordering)
            elif selection.kind == "secret":
                # no worker target will stop its copies itself: every target's, stale (copies.py)
                await conn.execute(q["mark_every_copy_stale_matching"], selection.sources_patterns)
            if selection.kind == "everything":
                await conn.execute(q["forget_every_failure"])
                await conn.execute(q["forget_every_fetch"])
            else:
                await conn.execute(q["forget_failures"], reached, path)
                await conn.execute(q["forget_fetches"], reached, path)
            match = selection.match
            if selection.kind == "secret" and not (match.get("alias") or match.get("pinned")):
                # the match reaches rows held through `latest`
                await conn.execute(q["forget_latest_held"], reached, path, match.get("version"))
            return changed

        changed = await self._db.transaction("invalidate", invalidate)
        # This process's window (other processes' writes are fenced).
        if selection.kind == "everything":
            self._fetcher.forget()
        elif selection.kind == "secret":
            self._fetcher.forget(selection.secret, any_project=selection.any_project)
        else:
            for key in reached:
                self._fetcher.forget(SecretIdentity.from_key(key))
        return changed

    @typed_errors
    async def forget_refusals(self, secret: SecretIdentity) -> None:
        """A notice of a secret that makes no value wrong (a version enabled, the secret created or due for
        rotation): its remembered refusals are forgotten, and the next read asks Secret Manager again."""
        await self._db.transaction("forget_refusals", lambda conn: conn.execute(
            self._db.q["forget_failures"], secret.reached_keys, None))

    @typed_errors
    async def stale_rows(self, selection: Selection, limit: int = 10_000) -> list[asyncpg.Record]:
        """A secret's rows an invalidation stopped serving (what a re-warm writes again)."""
        return await self._db.fetch("stale_rows_matching", selection.sources_patterns, limit)

    @typed_errors
    async def stale_secrets(self, limit: int = 100) -> list[SecretIdentity]:
        """Secrets that still have rows not served (invalidated, not yet refreshed)."""
        return [SecretIdentity.from_key(row["secret"]) for row in await self._db.fetch("stale_secrets", limit)]

    @typed_errors
    async def latest_secrets_to_check(self, limit: int) -> list[asyncpg.Record]:
        return await self._db.fetch("latest_secrets_to_check", limit)

    @typed_errors
    async def mark_checked(self, secret: SecretIdentity) -> None:
        await self._db.statement("mark_checked", "mark_checked", secret.key)

    @typed_errors
    async def generations(self, secrets: Iterable[SecretIdentity]) -> dict[SecretIdentity, int]:
        """The rotation generation of each secret (0 when never invalidated)."""
        wanted = list(secrets)
        found = dict(await self._db.fetch("secret_generations", [s.key for s in wanted]))
        return {secret: found.get(secret.key, 0) for secret in wanted}

    @typed_errors
    async def globals_to_refresh(self, within_seconds: float, limit: int = 1000) -> list[asyncpg.Record]:
        """Global rows read since written that expire within `within_seconds` (this process's reads counted first;
        other processes' within their KEYCHAIN_READ_FLUSH_SECONDS)."""
        await self._reads.flush()
        return await self._db.fetch("globals_to_refresh", float(within_seconds), limit)

    # --- the sweep --------------------------------------------------------------------------------------------------
    @typed_errors
    async def sweep(self, batch_size: int | None = None) -> int:
        """Delete expired rows, then the bookkeeping past its use; returns the rows deleted."""
        swept = await self.sweep_rows(batch_size)
        await self.sweep_bookkeeping(batch_size)
        return swept

    @typed_errors
    async def sweep_rows(self, batch_size: int | None = None) -> int:
        """This table's expired rows, in bounded batches; returns how many."""
        batch = batch_size or SWEEP_BATCH_SIZE
        total = 0
        while True:
            deleted = affected(await self._db.statement("sweep", "sweep_expired", batch))
            total += deleted
            metrics.SWEPT_ROWS.labels("keychain").inc(deleted)
            if deleted < batch:
                return total

    @typed_errors
    async def sweep_bookkeeping(self, batch_size: int | None = None) -> None:
        """What every target relies on, past its use: remembered refusals, the reconciliation summary, shared
        fetches, finished executions' fences, applied notices, copies whose rows someone else removed."""
        settings = self._db.settings
        retention = float(FENCE_RETENTION_SECONDS)
        await self._db.statement("sweep", "sweep_failures")
        await self._db.statement("sweep", "sweep_latest_held")
        await self._db.statement("sweep", "sweep_shared_fetches", float(settings.shared_fetch_seconds) * 2)
        await self._db.statement("sweep", "sweep_fences", retention)
        await self._db.statement("sweep", "sweep_notices", retention)
        await self._db.statement("sweep", "sweep_copies", retention, batch_size or SWEEP_BATCH_SIZE)

    # --- keys and figures -------------------------------------------------------------------------------------------
    @typed_errors
    async def rekey(self, batch_size: int | None = None) -> tuple[int, int]:
        """Re-encrypt every row under the active key, online. Returns (rows rekeyed, rows that failed to decrypt)."""
        batch = batch_size or REKEY_BATCH_SIZE
        active = self._keyring.active_key_id
        last_id, done, failed = 0, 0, 0
        while True:
            rows = await self._db.fetch("rekey_candidates", last_id, active, batch)
            if not rows:
                return done, failed
            columns: tuple[list[Any], ...] = ([], [], [], [], [])  # ids, key ids, data, write ids, old data
            for row in rows:
                identity = RowIdentity(row["credential_name"], row["scope_type"], row["scope_id"])
                try:
                    value = self._keyring.open(identity, row["key_id"], row["data"], row["write_id"])
                except DecryptionError as exc:
                    failed += 1
                    log.warning("rekey skipped row %s: %s", row["id"], exc)
                    continue
                write_id = new_write_id()
                kid, data = self._keyring.seal(identity, value, write_id)
                for column, item in zip(columns, (row["id"], kid, data, write_id, row["data"])):
                    column.append(item)
            if columns[0]:
                done += affected(await self._db.transaction("rekey", lambda conn: conn.execute(
                    self._db.q["rekey_rows"], *columns)))
            last_id = rows[-1]["id"]

    @typed_errors
    async def stats(self) -> list[dict[str, Any]]:
        await self._reads.flush()  # this process's hits included
        return [dict(row) for row in await self._db.fetch("stats")]

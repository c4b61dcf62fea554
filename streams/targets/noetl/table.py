"""The `noetl` target: NoETL's own `noetl.keychain`, read by NoETL's unmodified server (facts in aliases.py).

Writes: the rows NoETL's server itself would write on a miss (noetl.sql `upsert_rows`), each sealed in NoETL's
envelope under a fresh data key (envelope.py, kek.py), inside the library's fenced transaction
(Rows.write_fenced: the secrets' rotation generations, the executions' finish), and recorded as copies in our own
schema (keychain/copies.py) with what each cache key was resolved from. NoETL's tables are reached over the
keychain's own connection when they are in its database (one transaction for both), else over KEYCHAIN_CATALOG_DSN
(a transaction there, committed inside ours).
Rotation: an invalidation expires the copies' rows in the same transaction as the library's own (NoETL's server then
misses and never serves the old value), and the re-warm writes the new value. NoETL's server may have written a row
again under a key we warmed (after a miss, or its own refresh), with a version we do not know: so a version's
notice reaches every copy held through `latest` or an alias, besides the copies holding that version.
Purge and sweep delete NoETL's rows (the sweep never an `auto_renew` row) and tell, by the copies, the rows the warmer
wrote and the server then read, those nobody read, and those the server wrote itself under keys the warmer did not
warm (`keychain_noetl_rows_total{outcome}`; the Secret Manager calls saved: `keychain_noetl_calls_saved_total`).
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Sequence

import asyncpg

from keychain import metrics as library_metrics
from keychain.copies import Copies, Copy
from keychain.database import affected, typed_errors
from keychain.maintenance import SWEEP_BATCH_SIZE
from keychain.model import Provenance
from keychain.queries import parse_named_statements
from keychain.refs import SecretRef
from keychain.store import Keychain

from ... import metrics
from ...events import ExecutionEvent
from ...settings import WorkerSettings
from ..base import Filled, Purge, Selection, TargetPlan, Written
from .aliases import NoetlWant, noetl_plan
from .envelope import seal
from .kek import DataKeys, kek_for

log = logging.getLogger(__name__)

STATEMENTS = Path(__file__).with_name("noetl.sql")


def noetl_statements(schema: str) -> dict[str, str]:
    """noetl.sql with NoETL's schema (a setting checked against a strict pattern) put in."""
    quoted = '"' + schema.replace('"', '""') + '"'
    return {name: sql.replace("{noetl}", quoted)
            for name, sql in parse_named_statements(STATEMENTS.read_text()).items()}


async def shadowed_aliases(pool: asyncpg.Pool, statements: dict[str, str], aliases: set[str]) -> set[str]:
    """The aliases NoETL's server answers from `noetl.credential` (it asks there first), never from its keychain."""
    if not aliases:
        return set()
    ids = [int(a) for a in aliases if a.isdigit() and len(a) < 19]
    try:
        rows = await pool.fetch(statements["shadowed_aliases"], list(aliases), ids)
    except asyncpg.UndefinedTableError:  # a NoETL without a credential table shadows nothing
        return set()
    return {r["alias"] for r in rows}


def copy_patterns(secret_id: str, match: dict[str, Any]) -> list[dict[str, Any]]:
    """Which copies an invalidation reaches (`sources` containment patterns, any of them). As for our own rows
    (streams/notices.py), except that a version's notice also reaches every copy held through `latest` or an alias:
    NoETL's server may have written the row again, with a version we never saw."""
    base = {"secret_id": secret_id}
    if "version" not in match:
        return [{**base, **match}]
    floating = {**base, "pinned": False}
    return [floating] if match.get("pinned") is False else [floating, {**base, "version": match["version"]}]


class NoetlTarget:
    name = "noetl"

    def __init__(self, settings: WorkerSettings, keychain: Keychain, data_keys: DataKeys,
                 noetl_pool: asyncpg.Pool | None = None):
        """`noetl_pool`: a pool on NoETL's database when it is not the keychain's (KEYCHAIN_CATALOG_DSN)."""
        self.settings = settings
        self.keychain = keychain
        self.data_keys = data_keys
        self.copies = Copies(self.name)
        self._q = noetl_statements(settings.catalog_schema)
        self._own_pool = noetl_pool
        self._ttl = settings.noetl_ttl_seconds

    @classmethod
    async def open(cls, settings: WorkerSettings, keychain: Keychain, data_keys: DataKeys | None = None
                   ) -> "NoetlTarget":
        """`data_keys`: NoETL's key-encryption key's data keys (default: from NoETL's own variables)."""
        data_keys = data_keys or DataKeys(kek_for(settings))
        pool = None
        if settings.catalog_dsn:
            pool = await asyncpg.create_pool(settings.catalog_dsn, min_size=1, max_size=settings.pool_max_size,
                                             server_settings={"application_name": "keychain-warmer-noetl"})
        data_keys.start()
        return cls(settings, keychain, data_keys, pool)

    async def close(self) -> None:
        await self.data_keys.close()
        if self._own_pool is not None:
            await self._own_pool.close()

    @property
    def _pool(self) -> asyncpg.Pool:
        return self._own_pool or self.keychain.pool

    @asynccontextmanager
    async def _tables(self, conn: asyncpg.Connection) -> AsyncIterator[asyncpg.Connection]:
        """NoETL's tables inside the caller's transaction `conn`: the same connection when they share the database,
        else a transaction on NoETL's database that commits just before the caller's."""
        if self._own_pool is None:
            yield conn
            return
        async with self._own_pool.acquire() as other, other.transaction():
            yield other

    # --- the warm ---------------------------------------------------------------------------------------------------
    def plan(self, event: ExecutionEvent, playbook: dict[str, Any] | None) -> TargetPlan:
        plan = noetl_plan(event, playbook, project=self.settings.google_cloud_project)
        for skip in plan.skipped:
            metrics.NOETL_SKIPPED_ALIASES.labels(skip.reason).inc()
        return TargetPlan(plan.wants, plan.skipped)

    @typed_errors
    async def shadowed(self, aliases: set[str]) -> set[str]:
        return await shadowed_aliases(self._pool, self._q, aliases)

    async def not_yet_warm(self, wants: list[NoetlWant]) -> list[NoetlWant]:
        """Drop the aliases noetl.credential shadows (skipped, counted), and the rows already warm: a row NoETL's
        server would serve for at least half the TTL, written by us from the same secrets (a redelivery)."""
        if not wants:
            return []
        shadowed = await self.shadowed({w.alias for w in wants})
        for want in wants:
            if want.alias in shadowed:
                metrics.NOETL_SKIPPED_ALIASES.labels("credential_shadowed").inc()
        wants = [w for w in wants if w.alias not in shadowed]
        keys = [w.cache_key for w in wants]
        fresh = {r["cache_key"] for r in await self._fetch("fresh_rows", keys, float(self._ttl) / 2)}
        copies = await self.copies.of(self.keychain.pool, [k for k in keys if k in fresh])
        return [w for w in wants if not (w.cache_key in fresh and copies.get(w.cache_key) == (True, w.secrets))]

    @typed_errors
    async def _fetch(self, name: str, *args: Any) -> list[asyncpg.Record]:
        return await self._pool.fetch(self._q[name], *args)

    async def write(self, filled: Sequence[Filled]) -> Written[Filled]:
        """NoETL keeps no refusals in its keychain (its server asks Secret Manager itself, and fails): a refused
        secret writes nothing (`skipped`). Nor does a value that is not UTF-8, which NoETL's server refuses. Rows whose
        data keys could not be wrapped (Cloud KMS unreachable) are `failed`: the warm tries them again."""
        values = [(f, self._value(f)) for f in filled if f.error_code is None]
        usable = [(f, value) for f, value in values if value is not None]
        usable_ids = {id(f) for f, _ in usable}
        skipped = [f for f in filled if id(f) not in usable_ids]
        if not usable:
            return Written([], [], [], skipped)
        try:  # before any lock is taken: Cloud KMS is never waited for while holding one
            keys = await self.data_keys.take_many(len(usable))
        except Exception as exc:  # NoETL's server cannot open rows either while its KEK is unreachable
            metrics.NOETL_NOT_SEALED.inc(len(usable))
            log.warning("%d NoETL rows not sealed yet: their data keys could not be wrapped (%s)", len(usable),
                        type(exc).__name__)
            return Written([], [], [f for f, _ in usable], skipped)
        rows = [(f, seal(value, key)) for (f, value), key in zip(usable, keys)]

        async def write(conn: asyncpg.Connection, fresh: list[tuple[Filled, str]]) -> None:
            wants = [f.want for f, _ in fresh]
            async with self._tables(conn) as tables:
                await tables.execute(self._q["upsert_rows"], [w.cache_key for w in wants], [w.alias for w in wants],
                                     [w.catalog_id for w in wants], [w.execution_id for w in wants],
                                     [w.parent_execution_id for w in wants], [data for _, data in fresh],
                                     float(self._ttl))
            await self.copies.record(conn, [self._copy(f) for f, _ in fresh])
            library_metrics.ROWS_WRITTEN.labels(self.name).inc(len(fresh))

        fenced = {id(f) for f, _ in await self.keychain.rows.write_fenced(
            rows, fences=lambda row: row[0].fences, execution_id=lambda row: row[0].want.execution_id, write=write)}
        return Written([f for f, _ in rows if id(f) not in fenced], [f for f, _ in rows if id(f) in fenced], [],
                       skipped)

    @staticmethod
    def _value(filled: Filled) -> Any:
        texts = {}
        for name, ref in filled.want.fields:
            try:
                texts[name] = filled.values[str(ref)].value.payload.decode("utf-8")
            except UnicodeDecodeError:
                log.warning("NoETL alias %s: a secret's payload is not UTF-8 (NoETL's server refuses it); not warmed",
                            filled.want.alias)
                return None
        return texts[None] if list(texts) == [None] else texts

    def _copy(self, filled: Filled) -> Copy:
        want = filled.want
        sources = tuple(Provenance(ref, filled.values[str(ref)].value.version_name, name) for name, ref in want.fields)
        return Copy(want.cache_key, sources, self._ttl, want.execution_id, want.parent_execution_id,
                    {"alias": want.alias, "catalog_id": want.catalog_id})

    # --- purge, rotation, sweep ---------------------------------------------------------------------------------------
    def purge(self, execution_id: int) -> Purge:
        """The execution's rows (and its children's, by parent_execution_id) go, in the library's finish
        transaction: fenced, so no warm still fetching writes a row afterwards."""
        deleted: list[asyncpg.Record] = []  # of the attempt that committed
        warmed: dict[str, int] = {}

        async def delete(conn: asyncpg.Connection) -> int:
            nonlocal deleted, warmed
            async with self._tables(conn) as tables:
                deleted = await tables.fetch(self._q["purge_execution"], execution_id)
            warmed = await self.copies.forget(conn, [r["cache_key"] for r in deleted])
            return len(deleted)

        def committed() -> None:
            library_metrics.PURGED_ROWS.labels(self.name).inc(len(deleted))
            self._account(deleted, warmed)

        return Purge(delete, committed)

    def stop_serving(self, selection: Selection, *, drop: bool):
        """NoETL's rows an invalidation reaches stop being served (expired; deleted with `drop`, for a secret's), and
        their copies are marked stale (the re-warm writes them again). A secret's rows are found by their copies
        (what each cache key was resolved from); a credential's by its keychain name, an execution's by its id or
        its parent's, and all of them: whoever wrote them, NoETL's server included."""

        async def stop(conn: asyncpg.Connection) -> int:  # the rows first, then the copies: the lock order
            if selection.kind == "secret":
                patterns = copy_patterns(selection.secret_id, selection.match)
                keys = await self.copies.matching(conn, patterns)
                if not keys:
                    return 0
                async with self._tables(conn) as tables:
                    stopped = affected(await tables.execute(self._q["delete_rows" if drop else "expire_rows"], keys))
                await self.copies.stop_serving(conn, patterns, drop=drop)
                return stopped
            async with self._tables(conn) as tables:
                rows = await tables.fetch(self._q["expire_where"], selection.credential, selection.execution_id)
            await self.copies.mark_stale(conn, [r["cache_key"] for r in rows])
            return len(rows)

        return stop

    async def stale_wants(self, selection: Selection) -> list[NoetlWant]:
        stale = await self.copies.stale(self.keychain.pool, copy_patterns(selection.secret_id, selection.match))
        return [NoetlWant(c.detail["alias"], c.detail["catalog_id"], c.execution_id, c.parent_execution_id,
                          tuple((s.get("field"), SecretRef.parse(s["ref"])) for s in c.sources))
                for c in stale if c.execution_id is not None]

    async def globals_to_refresh(self, within_seconds: float) -> list[NoetlWant]:
        return []  # every row of NoETL's keychain is an execution's; its server refreshes a row it reads late itself

    async def stale_secret_ids(self, limit: int) -> list[str]:
        return await self.copies.stale_secret_ids(self.keychain.pool, limit)

    @typed_errors
    async def sweep(self) -> int:
        """NoETL's expired rows, whoever wrote them, in bounded batches (never an auto_renew row)."""
        batch, total = SWEEP_BATCH_SIZE, 0
        while True:
            deleted = await self._pool.fetch(self._q["sweep_expired"], batch)
            warmed = await self.copies.forget(self.keychain.pool, [r["cache_key"] for r in deleted])
            self._account(deleted, warmed)
            library_metrics.SWEPT_ROWS.labels(self.name).inc(len(deleted))
            total += len(deleted)
            if len(deleted) < batch:
                return total

    @staticmethod
    def _account(deleted: list[asyncpg.Record], warmed: dict[str, int]) -> None:
        """Rows that leave NoETL's table, told apart by whether the warmer wrote them and NoETL's server read them."""
        for row in deleted:
            fields = warmed.get(row["cache_key"])
            if fields is None:
                metrics.NOETL_ROWS["server_written"].inc()
            elif row["access_count"] > 0:
                metrics.NOETL_ROWS["warmed_read"].inc()
                metrics.NOETL_CALLS_SAVED.inc(fields)
            else:
                metrics.NOETL_ROWS["warmed_unread"].inc()

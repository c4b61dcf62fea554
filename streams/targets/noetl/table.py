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

import asyncio
import hashlib
import logging
import re
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Sequence

import asyncpg

from keychain import metrics as library_metrics
from keychain.copies import Copies, Copy
from keychain.database import typed_errors
from keychain.maintenance import SWEEP_BATCH_SIZE
from keychain.model import Provenance
from keychain.queries import parse_named_statements
from keychain.refs import SecretIdentity, SecretRef
from keychain.store import Keychain

from ... import metrics
from ...events import ExecutionEvent
from ...settings import WorkerSettings
from ..base import Filled, Purge, Selection, TargetPlan, Written, holdings
from .aliases import NoetlWant, noetl_plan
from .api import NoetlApi, NoetlApiError
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
    ids = [i for i in map(i64, aliases) if i is not None]
    try:
        rows = await pool.fetch(statements["shadowed_aliases"], list(aliases), ids)
    except asyncpg.UndefinedTableError:  # a NoETL without a credential table shadows nothing
        return set()
    return {r["alias"] for r in rows}


def fingerprint(sealed: str) -> str:
    """The fingerprint of a row's envelope, as noetl.sql computes it (sha256 of its text, hex)."""
    return hashlib.sha256(sealed.encode()).hexdigest()


def i64(text: str) -> int | None:
    """`text` as Rust's `str::parse::<i64>` reads it (NoETL's server looks a credential up by id when the alias
    parses): an optional sign, ASCII digits only, within 64 bits; else None."""
    if not re.fullmatch(r"[+-]?[0-9]+", text):
        return None
    value = int(text)
    return value if -2**63 <= value < 2**63 else None


async def every(calls) -> None:
    """All of these calls, each to its answer, then the first failure raised. None is cancelled when another fails: a
    request NoETL's server has received is applied even when its caller gives up, so a cancelled POST could land
    after the transaction that made it, and after the next rotation's POST (seen in the test of this). Awaited to
    their answers inside the fenced transaction, every write has reached NoETL before an invalidation of its secret
    can proceed."""
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    failed = next((o for o in outcomes if isinstance(o, BaseException)), None)
    if failed is not None:
        raise failed


def copy_patterns(selection: Selection) -> list[dict[str, Any]]:
    """Which copies an invalidation reaches (`sources` containment patterns, any of them). As for our own rows
    (streams/notices.py), except that a version's notice also reaches every copy held through `latest` or an alias:
    NoETL's server may have written the row again, with a version we never saw."""
    match = selection.match
    if "version" not in match:
        return selection.patterns()
    floating = selection.patterns({"pinned": False})
    return floating if match.get("pinned") is False else floating + selection.patterns({"version": match["version"]})


class NoetlTarget:
    name = "noetl"
    keeps_own_store = True

    def __init__(self, settings: WorkerSettings, keychain: Keychain, data_keys: DataKeys | None,
                 noetl_pool: asyncpg.Pool | None = None, api: NoetlApi | None = None):
        """`noetl_pool`: a pool on NoETL's database when it is not the keychain's (KEYCHAIN_CATALOG_DSN). `api`:
        NoETL's keychain API, which seals and writes the rows (then `data_keys` is None: the warmer holds no key)."""
        self.settings = settings
        self.keychain = keychain
        self.data_keys = data_keys
        self.api = api
        self.copies = Copies(self.name)
        self._q = noetl_statements(settings.catalog_schema)
        self._own_pool = noetl_pool
        self._ttl = settings.noetl_ttl_seconds

    @classmethod
    async def open(cls, settings: WorkerSettings, keychain: Keychain, data_keys: DataKeys | None = None
                   ) -> "NoetlTarget":
        """Through NoETL's keychain API when KEYCHAIN_NOETL_API_URL is set; else directly, sealing with
        `data_keys` (default: from NoETL's own variables)."""
        api = None
        if settings.noetl_api_url:
            token = settings.noetl_api_token.get_secret_value() if settings.noetl_api_token else None
            api, data_keys = NoetlApi(settings.noetl_api_url, token), None
        else:
            data_keys = data_keys or DataKeys(kek_for(settings))
            data_keys.start()
        pool = None
        if settings.catalog_dsn:
            pool = await asyncpg.create_pool(settings.catalog_dsn, min_size=1, max_size=settings.pool_max_size,
                                             server_settings={"application_name": "keychain-warmer-noetl"})
        return cls(settings, keychain, data_keys, pool, api)

    async def close(self) -> None:
        if self.api is not None:
            await self.api.close()
        if self.data_keys is not None:
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
        plan = noetl_plan(event, playbook, project=self.settings.noetl_project,
                          server_region=self.settings.noetl_server_region)
        for skip in plan.skipped:
            metrics.NOETL_SKIPPED_ALIASES.labels(skip.reason).inc()
        violations = sum(w.residency_violation for w in plan.wants)
        if violations:  # advisory: warmed, as NoETL's server resolves them, and counted
            metrics.NOETL_RESIDENCY_VIOLATIONS.inc(violations)
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
                metrics.NOETL_SKIPPED_ALIASES.labels("credential_table").inc()
        wants = [w for w in wants if w.alias not in shadowed]
        keys = [w.cache_key for w in wants]
        fresh = {r["cache_key"] for r in await self._fetch("fresh_rows", keys, float(self._ttl) / 2)}
        copies = await self.copies.of(self.keychain.pool, [k for k in keys if k in fresh])
        wanted = await holdings(wants, self.keychain.projects)
        return [w for w in wants if not (w.cache_key in fresh and copies.get(w.cache_key) == (True, wanted[id(w)]))]

    @typed_errors
    async def _fetch(self, name: str, *args: Any) -> list[asyncpg.Record]:
        return await self._pool.fetch(self._q[name], *args)

    async def write(self, filled: Sequence[Filled]) -> Written[Filled]:
        """NoETL keeps no refusals in its keychain (its server asks Secret Manager itself, and fails): a refused
        secret writes nothing (`skipped`). Nor does a value that is not UTF-8, which NoETL's server refuses. Rows
        that could not be sealed (Cloud KMS unreachable) or written (NoETL's API unreachable) are `failed`: the warm
        tries them again."""
        values = [(f, self._value(f)) for f in filled if f.error_code is None]
        usable = [(f, value) for f, value in values if value is not None]
        usable_ids = {id(f) for f, _ in usable}
        skipped = [f for f in filled if id(f) not in usable_ids]
        if not usable:
            return Written([], [], [], skipped)
        if self.api is not None:
            rows = usable  # NoETL's server seals them
            try:  # recorded before any is written: a rotation finds every row a POST may write, even one that fails
                await self.copies.record_before(self.keychain.pool,
                                                [self._copy(f, None, 0) for f, _ in usable if f.want.refs])
            except Exception as exc:
                log.warning("%d NoETL rows not written yet: their copies were not recorded (%s)", len(usable),
                            type(exc).__name__)
                return Written([], [], [f for f, _ in usable], skipped)
        else:
            try:  # before any lock is taken: Cloud KMS is never waited for while holding one
                keys = await self.data_keys.take_many(len(usable))
            except Exception as exc:  # NoETL's server cannot open rows either while its KEK is unreachable
                metrics.NOETL_NOT_SEALED.inc(len(usable))
                log.warning("%d NoETL rows not sealed yet: their data keys could not be wrapped (%s)", len(usable),
                            type(exc).__name__)
                return Written([], [], [f for f, _ in usable], skipped)
            rows = [(f, seal(value, key)) for (f, value), key in zip(usable, keys)]

        async def write(conn: asyncpg.Connection, fresh: list[tuple[Filled, Any]]) -> None:
            wants = [f.want for f, _ in fresh]
            async with self._tables(conn) as tables:
                if self.api is None:
                    reads_before = dict(await tables.fetch(
                        self._q["upsert_rows"], [w.cache_key for w in wants], [w.alias for w in wants],
                        [w.catalog_id for w in wants], [w.execution_id for w in wants],
                        [w.parent_execution_id for w in wants], [data for _, data in fresh], float(self._ttl)))
                    sealed = {w.cache_key: fingerprint(data) for w, (_, data) in zip(wants, fresh)}
                else:  # inside the fenced transaction, as a direct write: an invalidation waits for it, and for
                    # every POST to have been answered (none straggles past the transaction)
                    await every(self.api.put(w.catalog_id, w.alias, w.execution_id, value, self._ttl)
                                for w, (_, value) in zip(wants, fresh))
                    held = {r["cache_key"]: r for r in await tables.fetch(self._q["held_rows"],
                                                                           [w.cache_key for w in wants])}
                    if len(held) < len(wants):
                        raise NoetlApiError("a row written through the API is not in KEYCHAIN_CATALOG_SCHEMA.keychain")
                    reads_before = {key: row["access_count"] for key, row in held.items()}
                    sealed = {key: row["sealed"] for key, row in held.items()}
            await self.copies.record(conn, [self._copy(f, sealed[f.want.cache_key], reads_before[f.want.cache_key])
                                            for f, _ in fresh if f.want.refs])  # `map: {}` holds no secret

        try:
            fenced = {id(f) for f, _ in await self.keychain.rows.write_fenced(
                rows, fences=lambda row: row[0].fences, execution_id=lambda row: row[0].want.execution_id,
                write=write, target=self.name)}
        except NoetlApiError as exc:
            log.warning("%d NoETL rows not written yet: %s", len(rows), exc)
            return Written([], [], [f for f, _ in rows], skipped)
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

    def _copy(self, filled: Filled, sealed_fingerprint: str | None, reads_before: int) -> Copy:
        """What the row came from, and how to tell later that it still holds what was warmed (its envelope's
        fingerprint) and was read since (NoETL's server counts a read before it opens the row)."""
        want = filled.want
        sources = tuple(Provenance(ref, filled.values[str(ref)].value.version_name, name) for name, ref in want.fields)
        return Copy(want.cache_key, sources, self._ttl, want.execution_id, want.parent_execution_id,
                    {"alias": want.alias, "catalog_id": want.catalog_id, "sealed": sealed_fingerprint,
                     "reads_before": reads_before}, credential_name=want.alias)

    # --- purge, rotation, sweep ---------------------------------------------------------------------------------------
    def purge(self, execution_id: int) -> Purge:
        """The execution's rows (and its children's, by parent_execution_id) go, in the library's finish
        transaction: fenced, so no warm still fetching writes a row afterwards."""
        deleted: list[asyncpg.Record] = []  # of the attempt that committed
        warmed: dict[str, int] = {}

        async def delete(conn: asyncpg.Connection) -> int:
            nonlocal deleted, warmed
            children = await self.copies.of_children(conn, execution_id)  # API writes record no parent
            async with self._tables(conn) as tables:
                deleted = await tables.fetch(self._q["purge_execution"], execution_id, children)
            warmed = await self.copies.forget(conn, [r["cache_key"] for r in deleted])
            return len(deleted)

        def committed() -> None:
            library_metrics.PURGED_ROWS.labels(self.name).inc(len(deleted))
            self._account(deleted, warmed)

        return Purge(delete, committed)

    def stop_serving(self, selection: Selection, *, drop: bool):
        """NoETL's rows an invalidation reaches stop being served (expired; deleted with `drop`, for a secret's, and
        always through NoETL's API in API mode), and their copies are marked stale (the re-warm writes them again).
        A secret's rows are found by their copies (what each cache key was resolved from; a version's notice spares
        the rows that already hold it: `_behind`); a credential's by its keychain name, an execution's by its id or
        its parent's, and all of them: whoever wrote them, NoETL's server included."""

        async def stop(conn: asyncpg.Connection) -> int:  # the rows first, then the copies: the lock order
            keys = None
            if selection.kind == "secret":
                keys = await self.copies.matching(conn, copy_patterns(selection))
                if keys and selection.added_version is not None:
                    keys = await self._behind(conn, keys, selection, selection.added_version)
                if not keys:
                    return 0
            async with self._tables(conn) as tables:
                if self.api is not None:  # deleted through NoETL's API: the server misses until the re-warm
                    rows = await tables.fetch(self._q["rows_where"], keys, selection.credential,
                                              selection.execution_id)
                    await every(self.api.delete(r["catalog_id"], r["keychain_name"], r["execution_id"],
                                                r["scope_type"]) for r in rows)
                    stopped = [r["cache_key"] for r in rows]
                elif keys is not None:
                    statement = "delete_rows" if drop else "expire_rows"
                    stopped = [r["cache_key"] for r in await tables.fetch(self._q[statement], keys)]
                else:
                    stopped = [r["cache_key"] for r in await tables.fetch(
                        self._q["expire_where"], selection.credential, selection.execution_id)]
            if drop:
                await self.copies.forget(conn, keys or stopped)
            else:
                await self.copies.mark_stale(conn, keys if keys is not None else stopped)
            return len(stopped)

        return stop

    async def _behind(self, conn: asyncpg.Connection, keys: list[str], selection: Selection, added: str) -> list[str]:
        """Of these copies, those a version just added makes old: all but the rows that still hold what the warmer
        wrote (a row NoETL's server wrote again holds a version nobody knows) from this version or a newer one (the
        warm ran after the version was added, and the notice came after it)."""
        details = await self.copies.details(conn, keys)
        async with self._tables(conn) as tables:
            held = {r["cache_key"]: r["sealed"] for r in await tables.fetch(self._q["held_rows"], keys)}

        def current(key: str) -> bool:
            sources, detail = details.get(key, ([], {}))
            versions = [s.get("version", "") for s in sources if s.get("secret") in selection.secrets]
            return (held.get(key) is not None and held.get(key) == detail.get("sealed") and bool(versions)
                    and all(v.isdigit() and added.isdigit() and int(v) >= int(added) for v in versions))

        return [key for key in keys if not current(key)]

    async def stale_wants(self, selection: Selection) -> list[NoetlWant]:
        stale = await self.copies.stale(self.keychain.pool, copy_patterns(selection))
        return [NoetlWant(c.detail["alias"], c.detail["catalog_id"], c.execution_id, c.parent_execution_id,
                          tuple((s.get("field"), SecretRef.parse(s["ref"])) for s in c.sources))
                for c in stale if c.execution_id is not None]

    async def globals_to_refresh(self, within_seconds: float) -> list[NoetlWant]:
        return []  # every row of NoETL's keychain is an execution's; its server refreshes a row it reads late itself

    async def stale_secrets(self, limit: int) -> list[SecretIdentity]:
        return await self.copies.stale_secrets(self.keychain.pool, limit)

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
    def _account(deleted: list[asyncpg.Record], warmed: dict[str, tuple[int, dict[str, Any]]]) -> None:
        """Rows that leave NoETL's table, told apart by whether the warmer wrote them and NoETL's server then served
        them: a first use from the cache only when the row was read after the warm AND still held what was warmed
        (the server counts a read before it opens the row; a row it could not open, it wrote again itself)."""
        for row in deleted:
            copy = warmed.get(row["cache_key"])
            if copy is None:
                metrics.NOETL_ROWS["server_written"].inc()
                continue
            fields, detail = copy
            if row["sealed"] != detail.get("sealed"):
                metrics.NOETL_ROWS["server_written"].inc()  # written again by the server: what it served was its own
            elif row["access_count"] > detail.get("reads_before", 0):
                metrics.NOETL_ROWS["warmed_read"].inc()
                metrics.NOETL_CALLS_SAVED.inc(fields)
            else:
                metrics.NOETL_ROWS["warmed_unread"].inc()

"""NoETL's catalog: the playbook of a start event that carries none, read (never written) from `noetl.catalog`.

NoETL's table: `catalog_id BIGINT PRIMARY KEY, path TEXT, version, kind, content TEXT` (the YAML as registered),
`payload JSONB`, `UNIQUE (path, version)`. Looked up by `catalog_id`, else by path (and version when given, else
the newest). A catalog row never changes, so parsed playbooks are kept by `catalog_id` in a bounded LRU, and
concurrent lookups of one row share one query. A row that is not there yet is asked for again briefly, then the event
is dead-lettered `playbook_not_found`; a database outage propagates (the caller holds the batch and retries).
YAML is parsed with a safe loader, within a size limit, and refuses alias bombs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from typing import Any

import asyncpg
import yaml


from .settings import WorkerSettings
from .events import BadEvent, ExecutionEvent

log = logging.getLogger(__name__)

MAX_PLAYBOOK_BYTES = 1024 * 1024  # larger catalog playbooks are refused (invalid_playbook)

MAX_ALIASES = 100  # a playbook reuses an anchor a few times; a billion-laughs document needs thousands


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, counting alias uses: an alias bomb expands exponentially through a handful of them."""

    def __init__(self, stream):
        super().__init__(stream)
        self._aliases = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise yaml.YAMLError(f"more than {MAX_ALIASES} aliases")
        return super().compose_node(parent, index)


def parse_playbook(content: str | None, payload: Any, *, max_bytes: int) -> dict[str, Any]:
    """The playbook of a catalog row: its YAML `content`, else its `payload` (as NoETL's server reads it)."""
    if content:
        if len(content.encode()) > max_bytes:
            raise BadEvent("invalid_playbook",
                           f"the catalog's YAML is larger than KEYCHAIN_MAX_PLAYBOOK_BYTES={max_bytes}")
        try:
            document = yaml.load(content, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
        except (yaml.YAMLError, RecursionError, ValueError) as exc:
            raise BadEvent("invalid_playbook", f"the catalog's YAML does not parse: {type(exc).__name__}") from None
    else:
        document = json.loads(payload) if isinstance(payload, str) else payload
    if not isinstance(document, dict):
        raise BadEvent("invalid_playbook", "the catalog's playbook is not a mapping")
    return document


class Catalog:
    cache_size = 1000  # parsed playbooks kept, by catalog id
    """Reads playbooks from NoETL's catalog table through `pool` (the keychain's, or one of its own)."""

    def __init__(self, settings: WorkerSettings, pool: asyncpg.Pool, *, owns_pool: bool = False):
        self.settings = settings
        self.pool = pool
        self._owns_pool = owns_pool
        table = f'"{settings.catalog_schema}".catalog'  # the schema name is checked by its setting's pattern
        self._by_id = f"SELECT catalog_id, content, payload FROM {table} WHERE catalog_id = $1"
        self._by_path = (f"SELECT catalog_id, content, payload FROM {table} WHERE path = $1 "
                         f"AND ($2::int IS NULL OR version = $2) ORDER BY version DESC LIMIT 1")
        self._cache: OrderedDict[int, dict[str, Any] | BadEvent] = OrderedDict()
        self._inflight: dict[tuple, asyncio.Future] = {}

    @classmethod
    async def open(cls, settings: WorkerSettings, keychain_pool: asyncpg.Pool) -> "Catalog":
        if not settings.catalog_dsn:
            return cls(settings, keychain_pool)
        pool = await asyncpg.create_pool(settings.catalog_dsn, min_size=0, max_size=2)
        return cls(settings, pool, owns_pool=True)

    async def close(self) -> None:
        if self._owns_pool:
            await self.pool.close()

    @staticmethod
    def needed_for(event: ExecutionEvent) -> bool:
        """Whether the event's playbook must come from the catalog: it carries none, names one, and has a workload
        (a record without one resolves nothing)."""
        return (not isinstance(event.playbook, dict) and event.workload is not None
                and (event.catalog_id is not None or bool(event.playbook_path)))

    async def playbook_for(self, event: ExecutionEvent) -> dict[str, Any] | None:
        """The event's own playbook document, else the catalog's; None when the event names none (or needs none)."""
        if not self.needed_for(event):
            return self._own(event)
        return await self._lookup(self._key(event))

    async def playbooks_for(self, events: list[ExecutionEvent]) -> list[dict[str, Any] | None | BaseException]:
        """playbook_for of each event of a batch: one lookup per distinct catalog row however many events name it
        (a burst of one playbook's executions costs one dictionary lookup, not one task per event). Where an
        event's playbook cannot be had, its exception (BadEvent, or a database outage) is in its place."""
        keys = [self._key(e) if self.needed_for(e) else None for e in events]
        distinct = list(dict.fromkeys(k for k in keys if k is not None))
        found = dict(zip(distinct, await asyncio.gather(*(self._lookup(k) for k in distinct), return_exceptions=True)))
        return [found[k] if k is not None else self._own(e) for e, k in zip(events, keys)]

    @staticmethod
    def _own(event: ExecutionEvent) -> dict[str, Any] | None:
        return event.playbook if isinstance(event.playbook, dict) else None

    @staticmethod
    def _key(event: ExecutionEvent) -> tuple:
        if event.catalog_id is not None:
            return ("id", event.catalog_id)
        return ("path", event.playbook_path, event.playbook_version)

    async def _lookup(self, key: tuple) -> dict[str, Any]:
        if key[0] == "id" and key[1] in self._cache:
            return self._cached(key[1])
        if key not in self._inflight:  # one query per row, however many events of a burst ask at once
            self._inflight[key] = asyncio.ensure_future(self._load(key))
            self._inflight[key].add_done_callback(lambda _: self._inflight.pop(key, None))
        return self._cached(await asyncio.shield(self._inflight[key]))

    def _cached(self, catalog_id: int) -> dict[str, Any]:
        self._cache.move_to_end(catalog_id)
        found = self._cache[catalog_id]
        if isinstance(found, BadEvent):
            raise found
        return found

    async def _load(self, key: tuple) -> int:
        """Read the row (asking again while it is missing, up to KEYCHAIN_CATALOG_WAIT_SECONDS); returns its id."""
        deadline = time.monotonic() + self.settings.catalog_wait_seconds
        delay = 0.05
        while True:
            try:
                if key[0] == "id":
                    row = await self.pool.fetchrow(self._by_id, key[1])
                else:
                    row = await self.pool.fetchrow(self._by_path, key[1], key[2])
            except (asyncpg.UndefinedTableError, asyncpg.InvalidSchemaNameError, asyncpg.InsufficientPrivilegeError):
                log.warning("NoETL's catalog %s.catalog cannot be read (KEYCHAIN_CATALOG_SCHEMA, KEYCHAIN_CATALOG_DSN)",
                            self.settings.catalog_schema)
                raise BadEvent("playbook_not_found", "NoETL's catalog table cannot be read") from None
            if row is not None:
                break
            if time.monotonic() + delay > deadline:
                what = f"catalog_id {key[1]}" if key[0] == "id" else "the playbook's path"
                raise BadEvent("playbook_not_found", f"{what} is not in NoETL's catalog")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
        try:  # in a thread: a large YAML document takes a while in pure Python, and the event loop must go on
            parsed: dict[str, Any] | BadEvent = await asyncio.to_thread(
                parse_playbook, row["content"], row["payload"], max_bytes=MAX_PLAYBOOK_BYTES)
        except BadEvent as bad:  # a catalog row never changes: remember the refusal too
            parsed = bad
        self._cache[row["catalog_id"]] = parsed
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return row["catalog_id"]

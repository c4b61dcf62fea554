"""The `keychain` target: our own table, through the `keychain` library (what workers using the library read)."""

from __future__ import annotations

import logging
from typing import Any, Sequence

from keychain.logs import secret_label
from keychain.model import Entry, Provenance, Scope, value_from_payload
from keychain.refs import SecretIdentity
from keychain.store import Keychain

from .. import metrics
from ..events import ExecutionEvent
from ..resolve import Want, resolve
from .base import Filled, Selection, TargetPlan, Written, holdings

log = logging.getLogger(__name__)


class KeychainTarget:
    name = "keychain"
    keeps_own_store = False  # the library's own table

    def __init__(self, keychain: Keychain, *, project: str | None, server_region: str = ""):
        self.keychain = keychain
        self._project = project
        self._server_region = server_region  # NOETL_SERVER_REGION: the residency gate of keychain entries

    def plan(self, event: ExecutionEvent, playbook: dict[str, Any] | None) -> TargetPlan:
        plan = resolve(event, playbook, project=self._project, server_region=self._server_region)
        for skip in plan.skipped:
            metrics.SKIPPED_DECLARATIONS.labels(skip.reason).inc()
        return TargetPlan(plan.wants, plan.skipped)

    async def not_yet_warm(self, wants: list[Want]) -> list[Want]:
        """Drop the wants already warm with the same values (each field's secret, by identity, at the same version
        as referenced) and at least half a TTL left (a redelivery, a global credential already shared). A global
        name that holds other values (another secret, another project's, another version) is written over: logged
        and counted, as two playbooks disagreeing on what one global name means is worth an operator's look."""
        existing = await self.keychain.rows.existing((w.identity for w in wants), self.keychain.settings.ttl_seconds / 2)
        wanted = await holdings(wants, self.keychain.projects)
        todo = []
        for want in wants:
            found = existing.get(want.identity)
            holds = wanted[id(want)]
            if found is not None and found[1] and found[1] != holds and want.scope.type == "global":
                shown = self.keychain.settings.log_secret_ids
                log.warning("global credential %s repointed from %s to %s", want.credential_name,
                            ", ".join(secret_label(t, shown) for t in sorted(found[1])),
                            ", ".join(secret_label(t, shown) for t in sorted(holds)))
                metrics.GLOBAL_REPOINTS.inc()
            if found is None or not found[0] or found[1] != holds:
                todo.append(want)
        return todo

    async def write(self, filled: Sequence[Filled]) -> Written[Filled]:
        """One durable statement: all written or, when it raises, none (the warm's caller holds the batch)."""
        entries = {id(f): self._entry(f) for f in filled}
        fenced = await self.keychain.rows.put_many(list(entries.values()))
        fenced_ids = {id(f) for f in filled if entries[id(f)] in fenced}
        return Written([f for f in filled if id(f) not in fenced_ids], [f for f in filled if id(f) in fenced_ids], [])

    @staticmethod
    def _entry(filled: Filled) -> Entry:
        want = filled.want
        if filled.error_code is not None:  # readers get CachedFailure until it expires
            return Entry(want.credential_name, want.scope, error_code=filled.error_code,
                         sources=tuple(Provenance(r, None, f) for f, r in want.fields))
        fetched = [(name, ref, filled.values[str(ref)]) for name, ref in want.fields]
        if len(fetched) == 1 and fetched[0][0] is None:
            value = value_from_payload(fetched[0][2].value.payload)
        else:
            value = {name: value_from_payload(f.value.payload) for name, _, f in fetched}
        sources = tuple(Provenance(ref, f.value.version_name, name) for name, ref, f in fetched)
        return Entry(want.credential_name, want.scope, value, sources=sources, fences=filled.fences)

    def purge(self, execution_id: int) -> None:
        return None  # the library's finish purges this table

    def stop_serving(self, selection: Selection, *, drop: bool) -> None:
        return None  # the library's invalidation is this table's

    async def stale_wants(self, selection: Selection) -> list[Want]:
        rows = await self.keychain.maintenance.stale_rows(selection)
        return [Want.from_sources(row["credential_name"],
                                  Scope.of(execution_id=row["execution_id"], session_id=row["session_id"],
                                           scope=row["scope_type"]), row["sources"])
                for row in rows]

    async def stale_secrets(self, limit: int) -> list[SecretIdentity]:
        return await self.keychain.maintenance.stale_secrets(limit)

    async def sweep(self) -> int:
        return await self.keychain.maintenance.sweep_rows()

    async def globals_to_refresh(self, within_seconds: float) -> list[Want]:
        """Keep warm: global rows that are read and about to expire."""
        rows = await self.keychain.maintenance.globals_to_refresh(within_seconds)
        return [Want.from_sources(row["credential_name"], Scope.of(), row["sources"]) for row in rows]

    async def close(self) -> None:
        return None

"""Execution events -> keychain rows: warm on start, purge and fence on finish.

Per batch: finishes first (fence + purge, so a start in the same batch or redelivered later writes nothing), then
every start's wanted rows, minus those already warm; each distinct secret version is fetched ONCE per burst
(a short in-memory window shared by consecutive batches), with bounded concurrency and a calls-per-minute budget;
then all rows are written in one durable statement. The caller acknowledges the batch only after `handle` returns.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from aiolimiter import AsyncLimiter

from keychain.crypto import RowIdentity
from keychain.errors import PERMANENT_ERRORS, SecretSourceError
from keychain.model import Entry, Provenance, value_from_payload
from keychain.refs import SecretRef
from keychain.settings import Settings
from keychain.sources import SecretManagerSource, SecretValue
from keychain.store import Keychain

from .events import BadEvent, ExecutionEvent, parse_event
from .resolve import Want, resolve

log = logging.getLogger(__name__)


@dataclass
class Record:
    """One consumed message, as the agent hands it over."""

    key: bytes | None
    value: bytes | None
    topic: str = ""
    partition: int = 0
    offset: int = 0


@dataclass
class DeadLetter:
    record: Record
    reason: str
    detail: str


@dataclass
class BatchResult:
    started: int = 0
    finished: int = 0
    rows_written: int = 0
    rows_purged: int = 0
    dead: list[DeadLetter] = field(default_factory=list)


class Warmer:
    def __init__(self, settings: Settings, keychain: Keychain, source: SecretManagerSource):
        self.settings = settings
        self.keychain = keychain
        self.source = source
        self._limiter = AsyncLimiter(settings.secret_manager_max_calls_per_minute, 60)
        self._concurrency = asyncio.Semaphore(settings.warm_concurrency)
        self._recent: dict[str, tuple[float, SecretValue]] = {}  # ref -> (fetched at, value): the burst window

    def forget(self, refs: set[str] | None = None) -> None:
        """Drop fetched values from the burst window (all, or those of some references)."""
        if refs is None:
            self._recent.clear()
        else:
            for ref in refs:
                self._recent.pop(ref, None)

    async def handle(self, records: list[Record]) -> BatchResult:
        result = BatchResult()
        starts: list[tuple[Record, ExecutionEvent]] = []
        for record in records:
            try:
                event = parse_event(record.key, record.value, max_bytes=self.settings.max_event_bytes)
            except BadEvent as bad:
                result.dead.append(DeadLetter(record, bad.reason, bad.detail))
                continue
            if event.is_finish:
                result.finished += 1
                result.rows_purged += await self.keychain.finish_execution(event.execution_id)
            else:
                starts.append((record, event))
        if starts:
            await self._warm(starts, result)
        return result

    async def _warm(self, starts: list[tuple[Record, ExecutionEvent]], result: BatchResult) -> None:
        wants_by_record: list[tuple[Record, list[Want]]] = []
        for record, event in starts:
            try:
                wants_by_record.append((record, resolve(event)))
                result.started += 1
            except BadEvent as bad:
                result.dead.append(DeadLetter(record, bad.reason, bad.detail))
        all_wants = [w for _, wants in wants_by_record for w in wants]
        # Already warm with at least half a TTL left: a redelivery, or a global credential another execution warmed.
        ready = await self.keychain.ready_identities(
            (w.scope.identity(w.credential_name) for w in all_wants), self.settings.ttl_seconds / 2
        )
        refs = {str(ref) for w in all_wants if w.scope.identity(w.credential_name) not in ready for ref in w.refs}
        values, errors = await self._fetch_all(refs)

        entries: dict[RowIdentity, Entry] = {}
        for record, wants in wants_by_record:
            reasons = set()
            for want in wants:
                identity = want.scope.identity(want.credential_name)
                if identity in ready:
                    continue
                failed = [errors[str(ref)] for ref in want.refs if str(ref) in errors]
                if failed:
                    reasons.add(failed[0])
                    if failed[0] in PERMANENT_ERRORS:
                        entries[identity] = Entry(want.credential_name, want.scope, error_code=failed[0])
                    continue
                entries[identity] = self._entry(want, values)
            for reason in sorted(reasons):
                detail = "Secret Manager refused a secret this execution names"
                result.dead.append(DeadLetter(record, f"secret_{reason.lower()}", detail))
        await self.keychain.put_many(list(entries.values()))
        result.rows_written += len(entries)

    @staticmethod
    def _entry(want: Want, values: dict[str, SecretValue]) -> Entry:
        fetched = [(name, ref, values[str(ref)]) for name, ref in want.fields]
        if len(fetched) == 1 and fetched[0][0] is None:
            value = value_from_payload(fetched[0][2].payload)
        else:
            value = {name: value_from_payload(secret.payload) for name, _, secret in fetched}
        sources = tuple(Provenance(ref, secret.version_name) for _, ref, secret in fetched)
        return Entry(want.credential_name, want.scope, value, sources=sources)

    async def _fetch_all(self, refs: set[str]) -> tuple[dict[str, SecretValue], dict[str, str]]:
        """Each reference at most once: from the burst window, the negative cache, or one Secret Manager call.
        Returns (values by ref, error codes by ref). Transient failures are retried until the warm deadline."""
        now = time.monotonic()
        window = self.settings.warm_fetch_window_seconds
        self._recent = {ref: item for ref, item in self._recent.items() if now - item[0] < window}
        values = {ref: self._recent[ref][1] for ref in refs if ref in self._recent}
        errors = await self.keychain.active_failures(refs - values.keys()) if refs - values.keys() else {}
        pending = refs - values.keys() - errors.keys()
        deadline = now + self.settings.warm_deadline_seconds
        delay = self.settings.secret_manager_retry_initial_seconds
        while pending:
            outcomes = await asyncio.gather(*(self._fetch(ref) for ref in pending))
            transient = set()
            for ref, outcome in zip(pending, outcomes):
                if isinstance(outcome, SecretValue):
                    values[ref] = outcome
                    self._recent[ref] = (time.monotonic(), outcome)
                elif outcome.permanent:
                    errors[ref] = outcome.code
                    await self.keychain.record_failure(ref, outcome.code)
                else:
                    transient.add(ref)
                    errors[ref] = outcome.code
            pending = transient
            if pending and time.monotonic() + delay < deadline:
                log.warning("Secret Manager unavailable for %d reference(s); retrying in %.1fs", len(pending), delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.secret_manager_retry_max_seconds)
                for ref in pending:
                    errors.pop(ref, None)
            else:
                break
        return values, errors

    async def _fetch(self, ref: str) -> SecretValue | SecretSourceError:
        async with self._concurrency:
            await self._limiter.acquire()
            try:
                return await self.source.access(SecretRef.parse(ref))
            except SecretSourceError as exc:
                return exc

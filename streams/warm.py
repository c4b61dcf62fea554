"""Execution events -> keychain rows: warm on start, purge and fence on finish.

Per batch: finishes first (fence + purge, so a start in the same batch or redelivered later writes nothing); other
event types are counted and ignored; then every start's plan (its playbook from the event or NoETL's catalog, looked
up concurrently, resolved by streams/resolve.py) and its wanted rows, minus those already warm. Each distinct secret
version is fetched ONCE per burst (an in-memory window shared by consecutive batches, and Keychain.fetch_checked
across processes), with bounded concurrency and the calls-per-minute budget all processes share. Rows are
written as soon as their secrets are in hand, in one durable statement per round, so an execution whose secret is
UNAVAILABLE does not hold back the others; it is retried until the warm deadline, then dead-lettered for replay.
The caller acknowledges the batch only after `handle` returns.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

from keychain.errors import PERMANENT_ERRORS, SecretSourceError
from keychain.model import Entry, Provenance, Scope, value_from_payload
from keychain.refs import SecretRef
from keychain.sources import SecretValue
from keychain.store import Keychain

from . import metrics
from .batches import DATABASE_DOWN, DeadLetter, Record
from .catalog import Catalog
from .events import BadEvent, ExecutionEvent, parse_event
from .plan import plan_of
from .resolve import Want
from .settings import WorkerSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fetched:
    value: SecretValue
    generation: int  # of the secret, read before the value was fetched: the write is fenced on it


@dataclass
class BatchResult:
    started: int = 0
    finished: int = 0
    ignored: int = 0  # other event types of a well-formed envelope (NoETL's step and command records)
    skipped: int = 0  # declarations of started executions that are not warmed (their reasons are in the metric)
    rows_written: int = 0
    rows_purged: int = 0
    dead: list[DeadLetter] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.started} started, {self.finished} finished, {self.ignored} ignored, {self.rows_written} rows "
                f"written, {self.rows_purged} purged, {self.skipped} declarations skipped, {len(self.dead)} "
                "dead-lettered")


@contextmanager
def _timed(step: str) -> Iterator[None]:
    """Where a warm's time goes, step by step (keychain_warm_step_seconds)."""
    started = time.perf_counter()
    try:
        yield
    finally:
        metrics.WARM_STEP[step].observe(time.perf_counter() - started)


class Warmer:
    def __init__(self, settings: WorkerSettings, keychain: Keychain, catalog: Catalog | None = None):
        """`keychain` fetches through its Secret Manager source (Keychain.fetch_checked: once across processes)."""
        self.settings = settings
        self.keychain = keychain
        self.catalog = catalog  # NoETL's catalog, for start events that carry no playbook
        self._concurrency = asyncio.Semaphore(settings.warm_concurrency)
        # The burst window: ref -> (fetched at, value, the secret's rotation generation read before the fetch).
        self._recent: dict[str, tuple[float, Fetched]] = {}

    def forget(self, refs: set[str] | None = None) -> None:
        """Drop fetched values from the burst window (all, or those of some references)."""
        if refs is None:
            self._recent.clear()
        else:
            for ref in refs:
                self._recent.pop(ref, None)

    def forget_secret(self, secret_id: str) -> None:
        self.forget({ref for ref in self._recent if SecretRef.parse(ref).secret == secret_id})

    # --- events -----------------------------------------------------------------------------------------------------
    async def handle(self, records: list[Record], on_wait: Callable[[], None] = lambda: None) -> BatchResult:
        """One batch. Bad input, and an unexpected error, dead-letter their own event only; a database that is down
        raises (the caller holds the batch and retries it whole: every step is idempotent). `on_wait` is called
        whenever the batch starts waiting for Secret Manager or for its write (the caller may start the next batch
        meanwhile)."""
        result = BatchResult()
        planning = time.perf_counter()
        starts: list[tuple[Record, ExecutionEvent]] = []
        for record in records:
            try:
                event = parse_event(record.key, record.value, max_bytes=self.settings.max_event_bytes)
                metrics.EVENTS_OF_KIND[event.kind].inc()
                if event.kind == "finish":
                    result.rows_purged += await self.keychain.finish_execution(event.execution_id)
                    result.finished += 1
                elif event.kind == "start":
                    starts.append((record, event))
                else:
                    result.ignored += 1
            except Exception as exc:
                result.dead.append(self._dead_letter(record, exc))
        planned: list[tuple[Record, list[Want]]] = []
        events = [event for _, event in starts]
        playbooks = (await self.catalog.playbooks_for(events) if self.catalog is not None
                     else [None] * len(events))  # None: the event's own
        for (record, event), playbook in zip(starts, playbooks):
            try:
                if isinstance(playbook, BaseException):
                    raise playbook
                plan = plan_of(event, playbook, self.settings)
            except BaseException as exc:
                result.dead.append(self._dead_letter(record, exc))
            else:
                result.started += 1
                result.skipped += len(plan.skipped)
                planned.append((record, plan.wants))
        metrics.WARM_STEP["plan"].observe(time.perf_counter() - planning)
        refused: dict[Want, str] = {}
        try:
            refused, result.rows_written = await self.warm([w for _, wants in planned for w in wants],
                                                           on_wait=on_wait)
        except DATABASE_DOWN:
            raise
        except Exception:  # one event's rows broke the batch's statement: write event by event to find it
            log.exception("a batch write failed; writing its %d events one by one", len(planned))
            for record, wants in list(planned):
                try:
                    one, written = await self.warm(wants, on_wait=on_wait)
                except Exception as exc:
                    result.dead.append(self._dead_letter(record, exc))
                    planned.remove((record, wants))
                else:
                    refused.update(one)
                    result.rows_written += written
        for record, wants in planned:
            for code in sorted({refused[w] for w in wants if w in refused}):
                detail = "Secret Manager did not give a secret this execution names"
                result.dead.append(DeadLetter(record, f"secret_{code.lower()}", detail))
        return result

    @staticmethod
    def _dead_letter(record: Record, exc: BaseException) -> DeadLetter:
        if isinstance(exc, BadEvent):
            return DeadLetter(record, exc.reason, exc.detail)
        if isinstance(exc, DATABASE_DOWN) or not isinstance(exc, Exception):
            raise exc  # the database is down (the caller retries the batch), or a cancellation
        log.error("event at %s failed: %s", record.source, type(exc).__name__, exc_info=exc)
        return DeadLetter(record, "internal_error", type(exc).__name__)

    # --- warming ----------------------------------------------------------------------------------------------------
    async def warm(
        self, wants: list[Want], *, skip_ready: bool = True, fresh: bool = False,
        on_wait: Callable[[], None] = lambda: None,
    ) -> tuple[dict[Want, str], int]:
        """Write a ready row for each wanted credential (a failed row where Secret Manager refused).
        `fresh`: fetch anew, reusing no value fetched a moment ago (keep-warm). `on_wait`: called before each wait for
        Secret Manager or for the write. Returns (error code of each want not written as ready, rows written)."""
        if skip_ready:
            with _timed("check"):
                wants = await self._not_yet_warm(wants)
        todo = list(dict.fromkeys(wants))
        refs = {str(ref) for w in todo for ref in w.refs}
        values = {} if fresh else self._from_window(refs)
        errors: dict[str, str] = {}
        refused: dict[Want, str] = {}
        written = 0
        deadline = time.monotonic() + self.settings.warm_deadline_seconds
        delay = self.settings.secret_manager_retry_initial_seconds
        while True:
            pending = {str(r) for w in todo for r in w.refs} - values.keys() - errors.keys()
            if pending:
                on_wait()
            with _timed("fetch"):
                await self._fetch_round(pending, values, errors, fresh)
            entries, waiting = {}, []
            for want in todo:
                codes = [errors[str(r)] for r in want.refs if str(r) in errors]
                permanent = [c for c in codes if c in PERMANENT_ERRORS]
                if permanent:
                    refused[want] = permanent[0]
                    entries[want] = Entry(want.credential_name, want.scope, error_code=permanent[0],
                                          sources=tuple(Provenance(r, None, f) for f, r in want.fields))
                elif codes:
                    waiting.append(want)
                else:
                    entries[want] = self._entry(want, values)
            if entries:  # the database works on the statement: this process is free
                on_wait()
            with _timed("write"):
                fenced = await self.keychain.put_many(list(entries.values()))
            written += len(entries) - len(fenced)
            if fenced:  # invalidated while we fetched: fetch those secrets again
                again = {str(p.ref) for e in fenced for p in e.sources}
                self.forget(again)
                for ref in again:
                    values.pop(ref, None)
                waiting += [w for w, e in entries.items() if e in fenced]
            todo = waiting
            if not todo:
                return refused, written
            if time.monotonic() + delay > deadline:
                for want in todo:
                    refused[want] = "UNAVAILABLE"
                return refused, written
            log.warning("Secret Manager unavailable for %d credential(s); retrying in %.2fs", len(todo), delay)
            on_wait()
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.settings.secret_manager_retry_max_seconds)
            for ref in [r for r, code in errors.items() if code not in PERMANENT_ERRORS]:
                del errors[ref]

    async def _not_yet_warm(self, wants: list[Want]) -> list[Want]:
        """Drop the wants already warm with the same secrets and at least half a TTL left (a redelivery, or a global
        credential already shared). A global name that holds other secrets is written over: logged and counted, as
        two playbooks disagreeing on what one global name means is worth an operator's look."""
        existing = await self.keychain.existing_rows((w.identity for w in wants), self.settings.ttl_seconds / 2)
        todo = []
        for want in wants:
            found = existing.get(want.identity)
            if found is not None and found[1] and found[1] != want.secrets and want.scope.type == "global":
                log.warning("global credential %s repointed from secret(s) %s to %s", want.credential_name,
                            ", ".join(sorted(found[1])), ", ".join(sorted(want.secrets)))
                metrics.GLOBAL_REPOINTS.inc()
            if found is None or not found[0] or found[1] != want.secrets:
                todo.append(want)
        return todo

    async def refresh_globals(self) -> int:
        """Keep warm: fetch again the global credentials that are read and about to expire. Returns rows written."""
        rows = await self.keychain.globals_to_refresh(self.settings.ttl_seconds / 4)
        wants = [Want.from_sources(row["credential_name"], Scope.of(), row["sources"]) for row in rows]
        if not wants:
            return 0
        _, written = await self.warm(wants, skip_ready=False, fresh=True)
        return written

    @staticmethod
    def _entry(want: Want, values: dict[str, Fetched]) -> Entry:
        fetched = [(name, ref, values[str(ref)]) for name, ref in want.fields]
        if len(fetched) == 1 and fetched[0][0] is None:
            value = value_from_payload(fetched[0][2].value.payload)
        else:
            value = {name: value_from_payload(f.value.payload) for name, _, f in fetched}
        sources = tuple(Provenance(ref, f.value.version_name, name) for name, ref, f in fetched)
        fences = tuple({ref.secret: f.generation for _, ref, f in fetched}.items())
        return Entry(want.credential_name, want.scope, value, sources=sources, fences=fences)

    # --- fetching ---------------------------------------------------------------------------------------------------
    def _from_window(self, refs: set[str]) -> dict[str, Fetched]:
        now = time.monotonic()
        window = self.settings.warm_fetch_window_seconds
        self._recent = {ref: item for ref, item in self._recent.items() if now - item[0] < window}
        return {ref: self._recent[ref][1] for ref in refs if ref in self._recent}

    async def _fetch_round(self, refs: set[str], values: dict[str, Fetched], errors: dict[str, str],
                           fresh: bool = False) -> None:
        """At most one call per reference, concurrently, shared with every other process and batch
        (Keychain.fetch_checked: the negative cache first, permanent refusals remembered); fills `values` and
        `errors` (error codes)."""
        if not refs:
            return
        ordered = sorted(refs)
        outcomes = await asyncio.gather(*(self._fetch(ref, fresh) for ref in ordered))
        for ref, outcome in zip(ordered, outcomes):
            if isinstance(outcome, Fetched):
                values[ref] = outcome
                self._recent[ref] = (time.monotonic(), values[ref])
            else:
                errors[ref] = outcome

    async def _fetch(self, ref: str, fresh: bool = False) -> Fetched | str:
        async with self._concurrency:
            try:
                fetched = await self.keychain.fetch_checked(SecretRef.parse(ref), reuse=not fresh)
            except SecretSourceError as exc:
                return exc.code
        return fetched if isinstance(fetched, str) else Fetched(*fetched)

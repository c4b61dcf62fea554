"""Execution events -> rows in every target (streams/targets/): warm on start, purge and fence on finish.

Per batch: finishes first (fence + purge in each target, so a start in the same batch or redelivered later writes
nothing); other event types are counted and ignored; then every start's playbook (from the event or NoETL's catalog,
one lookup per catalog row), each target's plan of it (the rows it wants), minus those already warm. Each distinct
secret version is fetched ONCE per burst for every target (the library's fetcher: its window, shared by consecutive
batches and by every process), with bounded concurrency and the calls-per-minute budget all processes share. Rows
are written as soon as their secrets are in hand, one durable statement per target and round, so an execution whose
secret is UNAVAILABLE does not hold back the others. One deadline per warm (KEYCHAIN_WARM_DEADLINE_SECONDS) bounds
everything it waits for: the fetcher's retries of Secret Manager, and the warm's own retries of a target's write that
failed (Cloud KMS down, say); past it the event is dead-lettered for replay with a closed reason. The caller
acknowledges the batch only after `handle` returns.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

from keychain.errors import PERMANENT_ERRORS, SecretSourceError
from keychain.fetcher import Fetched
from keychain.refs import SecretRef
from keychain.store import Keychain

from . import metrics
from .batches import DATABASE_DOWN, DeadLetter, Record
from .catalog import Catalog
from .events import BadEvent, ExecutionEvent, parse_event
from .plan import plans_of
from .settings import WorkerSettings
from .targets.base import Filled, Target, together
from .targets.keychain import KeychainTarget

log = logging.getLogger(__name__)

# A want not written as ready, and why: Secret Manager's refusal, or one of these (the dead letter's reason).
UNAVAILABLE = "UNAVAILABLE"  # Secret Manager kept answering UNAVAILABLE until the deadline
WRITE_FAILED = "WRITE_FAILED"  # the target could not write the row before the deadline
WARM_CONCURRENCY = 32  # Secret Manager calls in flight per worker (the shared budget bounds the rate)


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
    def __init__(self, settings: WorkerSettings, keychain: Keychain, catalog: Catalog | None = None,
                 targets: list[Target] | None = None):
        """`keychain` fetches through its Secret Manager source (its fetcher: once across processes);
        `targets`: where the rows go (default: the keychain's own table)."""
        self.settings = settings
        self.keychain = keychain
        self.catalog = catalog  # NoETL's catalog, for start events that carry no playbook
        self.targets: list[Target] = targets or [KeychainTarget(keychain, project=settings.google_cloud_project,
                                                                server_region=settings.noetl_server_region)]
        self._concurrency = asyncio.Semaphore(WARM_CONCURRENCY)

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
                if event.kind == "finish":
                    result.rows_purged += await self._finish(event.execution_id)
                    result.finished += 1
                elif event.kind == "start":
                    starts.append((record, event))
                else:
                    result.ignored += 1
            except Exception as exc:
                result.dead.append(self._dead_letter(record, exc))
        for kind, count in (("start", len(starts)), ("finish", result.finished), ("ignored", result.ignored)):
            if count:  # counted once a batch: NoETL's stream is mostly records to ignore
                metrics.EVENTS_OF_KIND[kind].inc(count)
        planned: list[tuple[Record, list[list]]] = []  # each start's wants, target by target
        events = [event for _, event in starts]
        playbooks = (await self.catalog.playbooks_for(events) if self.catalog is not None
                     else [None] * len(events))  # None: the event's own
        for (record, event), playbook in zip(starts, playbooks):
            try:
                if isinstance(playbook, BaseException):
                    raise playbook
                plans = plans_of(event, playbook, self.targets)
            except BaseException as exc:
                result.dead.append(self._dead_letter(record, exc))
            else:
                result.started += 1
                result.skipped += sum(len(plan.skipped) for plan in plans)
                planned.append((record, [plan.wants for plan in plans]))
        metrics.WARM_STEP["plan"].observe(time.perf_counter() - planning)
        refused: list[dict] = [{} for _ in self.targets]
        try:
            refused, result.rows_written = await self._warm_targets([wants for _, wants in planned], on_wait)
        except DATABASE_DOWN:
            raise
        except Exception:  # one event's rows broke the batch's statement: write event by event to find it
            log.exception("a batch write failed; writing its %d events one by one", len(planned))
            for record, wants in list(planned):
                try:
                    one, written = await self._warm_targets([wants], on_wait)
                except Exception as exc:
                    result.dead.append(self._dead_letter(record, exc))
                    planned.remove((record, wants))
                else:
                    for mine, theirs in zip(refused, one):
                        mine.update(theirs)
                    result.rows_written += written
        for record, wants in planned:
            codes = {target_refused[w] for target_refused, target_wants in zip(refused, wants) for w in target_wants
                     if w in target_refused}
            for code in sorted(codes):
                if code == WRITE_FAILED:
                    result.dead.append(DeadLetter(record, "write_failed", "a target could not write this execution's "
                                                  "rows before the warm deadline"))
                else:
                    detail = "Secret Manager did not give a secret this execution names"
                    result.dead.append(DeadLetter(record, f"secret_{code.lower()}", detail))
        return result

    async def _finish(self, execution_id: int) -> int:
        """The library's finish (the execution fenced, its rows gone) with every target's own rows deleted in the
        same transaction. Returns rows deleted."""
        purges = [p for p in (target.purge(execution_id) for target in self.targets) if p is not None]
        deleted = await self.keychain.maintenance.finish_execution(execution_id,
                                                                   beside=together([p.delete for p in purges]))
        for purge in purges:
            purge.committed()
        return deleted

    async def _warm_targets(self, wants_by_event: list[list[list]], on_wait: Callable[[], None]
                            ) -> tuple[list[dict], int]:
        """Every target's wants of these events, side by side (their fetches are shared: one call per secret)."""
        outcomes = await asyncio.gather(*(
            self.warm([w for wants in wants_by_event for w in wants[i]], target=target, on_wait=on_wait)
            for i, target in enumerate(self.targets)))
        return [refused for refused, _ in outcomes], sum(written for _, written in outcomes)

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
        self, wants: list, *, target: Target | None = None, skip_ready: bool = True, fresh: bool = False,
        on_wait: Callable[[], None] = lambda: None, deadline: float | None = None,
    ) -> tuple[dict, int]:
        """Write a ready row for each wanted credential in `target` (the first target by default; a refusal as the
        target records one). `fresh`: fetch anew, reusing no value fetched a moment ago (keep-warm). `on_wait`:
        called before each wait for Secret Manager or for the write. `deadline` (time.monotonic(); default
        KEYCHAIN_WARM_DEADLINE_SECONDS from now): what is not written by then is given up. Returns (why each want
        was not written as ready: Secret Manager's refusal, UNAVAILABLE or WRITE_FAILED; rows written)."""
        target = target or self.targets[0]
        if not wants:
            return {}, 0
        if skip_ready:
            with _timed("check"):
                wants = await target.not_yet_warm(wants)
        deadline = deadline or time.monotonic() + self.settings.warm_deadline_seconds
        todo = list(dict.fromkeys(wants))
        values: dict[str, Fetched] = {}
        errors: dict[str, str] = {}
        fetching: dict[str, asyncio.Future[Fetched | str]] = {}
        refused: dict = {}
        written = 0
        retry_delay = self.settings.secret_manager_retry_initial_seconds
        try:
            while todo:
                needed = {str(r) for w in todo for r in w.refs}
                for ref in sorted(needed - values.keys() - errors.keys() - fetching.keys()):
                    fetching[ref] = asyncio.ensure_future(self._fetch(ref, fresh, deadline))
                self._collect(fetching, values, errors)
                filled, waiting = [], []
                for want in todo:
                    codes = [errors[str(r)] for r in want.refs if str(r) in errors]
                    permanent = [c for c in codes if c in PERMANENT_ERRORS]
                    if permanent:
                        refused[want] = permanent[0]
                        filled.append(Filled(want, error_code=permanent[0]))
                    elif codes:
                        refused[want] = codes[0]
                    elif all(str(r) in values for r in want.refs):
                        filled.append(Filled(want, {str(r): values[str(r)] for r in want.refs}))
                    else:
                        waiting.append(want)
                if not filled:  # nothing to write yet: wait for the next fetch to end
                    if waiting:
                        on_wait()
                        with _timed("fetch"):
                            await asyncio.wait(fetching.values(), return_when=asyncio.FIRST_COMPLETED)
                    todo = waiting
                    continue
                on_wait()  # the database works on the statement: this process is free
                with _timed("write"):
                    outcome = await target.write(filled)
                written += len(outcome.written)
                for fenced in outcome.fenced:  # invalidated while we fetched: fetch its new value
                    for ref in fenced.want.refs:
                        values.pop(str(ref), None)
                        self.keychain.fetcher.forget(self.keychain.projects.known(ref))
                failed = [f.want for f in outcome.failed]
                if failed and time.monotonic() + retry_delay > deadline:
                    refused.update(dict.fromkeys(failed, WRITE_FAILED))
                    failed = []
                elif failed:
                    log.warning("%d row(s) not written by target %s; retrying in %.2fs", len(failed), target.name,
                                retry_delay)
                    on_wait()
                    await asyncio.sleep(retry_delay)
                    retry_delay = min(retry_delay * 2, self.settings.secret_manager_retry_max_seconds)
                todo = waiting + [f.want for f in outcome.fenced] + failed
        finally:
            for future in fetching.values():
                future.cancel()
        return refused, written

    @staticmethod
    def _collect(fetching: dict[str, asyncio.Future[Fetched | str]], values: dict[str, Fetched],
                 errors: dict[str, str]) -> None:
        """Move the fetches that ended into `values` or `errors` (an error code)."""
        for ref in [ref for ref, future in fetching.items() if future.done()]:
            outcome = fetching.pop(ref).result()
            if isinstance(outcome, Fetched):
                values[ref] = outcome
            else:
                errors[ref] = outcome

    async def refresh_globals(self) -> int:
        """Keep warm: fetch again the global credentials that are read and about to expire, in every target that
        keeps any. Returns rows written."""
        written = 0
        for target in self.targets:
            wants = await target.globals_to_refresh(self.settings.ttl_seconds / 4)
            written += (await self.warm(wants, target=target, skip_ready=False, fresh=True))[1]
        return written

    # --- fetching ----------------------------------------------------------------------------------------------------
    async def _fetch(self, ref: str, fresh: bool, deadline: float) -> Fetched | str:
        """The library's fetcher (the one door: negative cache, window, single flight, across processes, its retries
        within `deadline`), WARM_CONCURRENCY at a time; an error code when it gives none."""
        async with self._concurrency:
            try:
                return await self.keychain.fetcher.fetch(SecretRef.parse(ref), reuse=not fresh, deadline=deadline)
            except SecretSourceError as exc:
                return exc.code

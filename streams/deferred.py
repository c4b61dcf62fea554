"""What each worker target with a store of its own (NoETL's keychain) applies of an invalidation, beside it: the
outbox entries the library's invalidation recorded for it (keychain/outbox.py), applied by that target alone.

Failures stay where they happen. Our own rows stopped being served when the invalidation committed, whatever the
other store answers. A target that answers is applied at once, right after the invalidation (within
APPLY_NOW_SECONDS, so that NoETL's server stops serving the old value before the notice is acknowledged); one that
does not is left to the background, where its entries are tried again with backoff, in order per secret, until done,
and no later invalidation waits for it. A refusal for good (an expired token, a missing grant: a 4xx other than 404,
409 and 429, or the database refusing) is counted by target and reason, logged once, and kept in the
`keychain_target_invalidations_refused{target}` gauge, which an operator pages on; it is tried again every
PERMANENT_RETRY_SECONDS, so that fixing the token or the grant drains it.
"""

from __future__ import annotations

import asyncio
import logging
import random

from keychain.errors import CONNECTION_ERRORS, KeychainConflict, KeychainDatabaseError, KeychainUnavailable
from keychain.invalidation import Selection
from keychain.outbox import Outbox, OutboxEntry

from . import metrics
from .targets.base import Target, TargetError

log = logging.getLogger(__name__)

APPLY_NOW_SECONDS = 2.0  # what an invalidation waits for a target that answered last time
RETRY_INITIAL_SECONDS = 0.5  # jittered, doubling per attempt of an entry, up to RETRY_MAX_SECONDS
RETRY_MAX_SECONDS = 60.0
PERMANENT_RETRY_SECONDS = 300.0
# Why a target did not apply an entry: a closed set (the metric's label).
REASONS = frozenset({"unauthorized", "rejected", "unavailable", "database_refused", "database_unavailable",
                     "internal_error"})


def failure_of(exc: BaseException) -> tuple[str, bool]:
    """(reason, refused for good) of a target's failure to apply an entry."""
    if isinstance(exc, TargetError):
        return exc.reason, exc.permanent
    if isinstance(exc, (KeychainUnavailable, KeychainConflict, *CONNECTION_ERRORS)):
        return "database_unavailable", False
    if isinstance(exc, KeychainDatabaseError):
        return "database_refused", True
    return "internal_error", True


class DeferredInvalidations:
    def __init__(self, outbox: Outbox, targets: list[Target]):
        self._outbox = outbox
        self._targets = {t.name: t for t in targets if t.keeps_own_store}
        self._answering = dict.fromkeys(self._targets, True)  # did its last attempt succeed
        self._draining: dict[str, asyncio.Task[None]] = {}
        self._wake = {name: asyncio.Event() for name in self._targets}
        self._rounds = {name: asyncio.Lock() for name in self._targets}
        self._logged: set[tuple[str, str]] = set()  # (target, reason) refusals logged since its last success

    @property
    def targets(self) -> list[str]:
        """The targets an invalidation defers work to."""
        return sorted(self._targets)

    async def apply_now(self) -> int:
        """Right after an invalidation: each target that answers applies its entries now (within
        APPLY_NOW_SECONDS); the others, and whatever is left, are applied in the background. Rows changed now. The
        gauges say what waits once this returns (the background drain keeps them current after it)."""
        changed = sum(await asyncio.gather(*(self._now(name) for name in self._targets)))
        await self._report()
        return changed

    async def _now(self, name: str) -> int:
        if not self._answering[name]:  # failing: no invalidation waits for it
            self.kick(name)
            return 0
        try:
            changed, retry_in = await asyncio.wait_for(asyncio.shield(self._locked_round(name)), APPLY_NOW_SECONDS)
        except (asyncio.TimeoutError, Exception):  # it goes on in the background; its failures are its own
            self.kick(name)
            return 0
        if retry_in is not None:
            self.kick(name)
        return changed

    def kick(self, name: str | None = None) -> None:
        """Apply a target's entries (every target's with no name) in the background: start, or wake, its drain."""
        for each in ([name] if name else list(self._targets)):
            task = self._draining.get(each)
            if task is None or task.done():
                self._draining[each] = asyncio.ensure_future(self._drain(each))
            else:
                self._wake[each].set()

    async def close(self) -> None:
        for task in self._draining.values():
            task.cancel()
        await asyncio.gather(*self._draining.values(), return_exceptions=True)

    async def _drain(self, name: str) -> None:
        """Every entry of the target that is due, round after round, until none is left."""
        while True:
            self._wake[name].clear()
            try:
                _, retry_in = await self._locked_round(name)
            except Exception as exc:  # the outbox itself unreadable (our database down): look again shortly
                log.warning("outbox of target %s not read: %s", name, type(exc).__name__)
                retry_in = RETRY_INITIAL_SECONDS * 4
            await self._report()
            if retry_in is None:
                return
            try:
                await asyncio.wait_for(self._wake[name].wait(), retry_in)
            except asyncio.TimeoutError:
                pass

    async def _locked_round(self, name: str) -> tuple[int, float | None]:
        async with self._rounds[name]:  # one round of a target at a time in this process
            return await self._round(name)

    async def _round(self, name: str) -> tuple[int, float | None]:
        """One pass over the due entries. Returns (rows changed, when to look again: None when nothing waits)."""
        target, changed, retry_in = self._targets[name], 0, None
        while entries := await self._outbox.due(name):
            blocked: set[str] = set()  # orderings with an entry not applied this round: later entries wait
            progressed = False
            for entry in entries:
                if entry.ordering in blocked:
                    continue
                try:
                    done = await self._apply(target, entry)
                except Exception as exc:
                    blocked.add(entry.ordering)
                    wait = await self._failed(name, entry, exc)
                    retry_in = wait if retry_in is None else min(retry_in, wait)
                    continue
                if done is None:  # another process is applying it
                    blocked.add(entry.ordering)
                    retry_in = min(retry_in or 1.0, 1.0)
                    continue
                progressed = True
                changed += done
                self._answered(name)
            if not progressed:
                break
        waiting = (await self._outbox.counts()).get(name)
        if waiting is not None:  # entries not due yet (their backoff): look again when the first is due
            due_in = max(0.05, waiting.next_due_seconds)
            retry_in = due_in if retry_in is None else min(retry_in, due_in)
        return changed, retry_in

    async def _apply(self, target: Target, entry: OutboxEntry) -> int | None:
        selection = Selection.from_json(entry.work["selection"])
        stop = target.stop_serving(selection, drop=bool(entry.work.get("drop")))

        async def nothing(_conn) -> int:
            return 0

        return await self._outbox.apply(entry, stop or nothing)

    def _answered(self, name: str) -> None:
        if not self._answering[name]:
            log.info("target %s applies invalidations again", name)
        self._answering[name] = True
        self._logged = {(target, reason) for target, reason in self._logged if target != name}

    async def _failed(self, name: str, entry: OutboxEntry, exc: BaseException) -> float:
        reason, permanent = failure_of(exc)
        self._answering[name] = False
        metrics.TARGET_FAILURES.labels(name, reason).inc()
        if reason == "internal_error":
            log.error("target %s: an invalidation failed (%s)", name, type(exc).__name__, exc_info=exc)
        elif permanent and (name, reason) not in self._logged:
            self._logged.add((name, reason))
            log.error("target %s refuses invalidations (%s: %s): our own rows are stopped, its rows still serve what "
                      "the invalidation stopped until this is fixed (keychain_target_invalidations_refused)",
                      name, reason, exc)
        elif not permanent:
            log.warning("target %s did not apply an invalidation (%s); trying again", name, reason)
        if permanent:
            wait = PERMANENT_RETRY_SECONDS
        else:
            ceiling = min(RETRY_INITIAL_SECONDS * 2 ** entry.attempts, RETRY_MAX_SECONDS)
            wait = random.uniform(ceiling / 2, ceiling)
        try:
            await self._outbox.failed(entry, retry_in=wait, reason=reason, permanent=permanent)
        except Exception as record_exc:  # our database down as well: the entry is simply due again
            log.warning("outbox entry of target %s: failure not recorded (%s)", name, type(record_exc).__name__)
        return wait

    async def _report(self) -> None:
        try:
            counts = await self._outbox.counts()
        except Exception:
            return
        for name in self._targets:
            held = counts.get(name)
            metrics.TARGET_INVALIDATIONS_WAITING.labels(name).set(held.waiting if held else 0)
            metrics.TARGET_INVALIDATIONS_REFUSED.labels(name).set(held.refused if held else 0)

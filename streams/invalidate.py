"""Rotation notices -> keychain: stop serving what a notice makes wrong at once, then refresh running executions'
rows beside the notices that follow (never on their path)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone

from keychain.errors import SecretSourceError
from keychain.logs import secret_label
from keychain.invalidation import Selection
from keychain.refs import SecretIdentity, SecretRef
from keychain.sources import SecretManagerSource
from keychain.store import Keychain

from . import metrics
from .batches import DATABASE_DOWN, DeadLetter, Record
from .events import BadEvent
from .notices import RotationNotice, notice_from_kafka
from .deferred import DeferredInvalidations
from .settings import WorkerSettings
from .warm import Warmer

log = logging.getLogger(__name__)

RECONCILE_BATCH = 50  # secrets compared per reconciliation round (GetSecretVersion: the read quota is 600 a minute)
REFRESHES_IN_FLIGHT = 4  # notices' refreshes running beside the notices stream
REFRESHES_WAITING = 256  # beyond: left to the leader's next round (the rows stay stopped, refresh_stale finds them)


@dataclass
class NoticesResult:
    applied: int = 0
    dead: list[DeadLetter] = field(default_factory=list)

    def summary(self) -> str:
        return f"{self.applied} notices applied, {len(self.dead)} dead-lettered"


@dataclass
class Applied:
    changed: int | None  # rows stopped being served; None for a duplicate notice
    refreshed: int
    lag_ms: float  # from Secret Manager's event time to the rows no longer being served


class Invalidator:
    """Every invalidation goes through `invalidate`, whichever door it came through: a rotation notice (`apply`),
    the operator (POST /invalidate, and `keychain invalidate` through the `keychain.invalidation` entry point:
    streams/runtime.py), reconciliation. One transaction of the library (Maintenance.invalidate) stops serving
    our selected rows, fenced, and records in the outbox what each target with a store of its own must still do;
    each such target applies it on its own (streams/deferred.py: at once when it answers, else with its own
    retries), so one target's failure never holds our rows or another target. It is counted by cause in
    keychain_invalidations_total; then running executions' rows are refreshed in every target."""

    def __init__(self, settings: WorkerSettings, keychain: Keychain, warmer: Warmer, source: SecretManagerSource):
        self.settings = settings
        self.keychain = keychain
        self.warmer = warmer
        self.source = source
        self.deferred = DeferredInvalidations(keychain.maintenance.outbox, warmer.targets)
        self.last_lag_ms: float | None = None  # of the last notice that stopped serving rows (/stats)
        self._refreshes = asyncio.Semaphore(REFRESHES_IN_FLIGHT)
        self._refreshing: set[asyncio.Task[int]] = set()

    async def settled(self) -> None:
        """Until the refreshes running beside the notices stream have ended."""
        while self._refreshing:
            await asyncio.gather(*self._refreshing, return_exceptions=True)

    async def close(self) -> None:
        """Refreshes running beside the stream, and targets' outbox work, stop (what they did not do is found again:
        stale rows by the leader's refresh, outbox entries by any process)."""
        for task in self._refreshing:
            task.cancel()
        await asyncio.gather(*self._refreshing, return_exceptions=True)
        await self.deferred.close()

    async def handle(self, records: list[Record]) -> NoticesResult:
        """A batch of notices from the rotations topic, in order (notices of one secret share a partition). A bad
        notice, or a bug, dead-letters that notice only; a database that is down raises (the batch runs again:
        notices are applied once, by id)."""
        result = NoticesResult()
        for record in records:
            try:
                await self.apply(notice_from_kafka(record.value), refresh="beside")
            except DATABASE_DOWN:
                raise
            except BadEvent as bad:
                result.dead.append(DeadLetter(record, bad.reason, bad.detail))
            except Exception as exc:
                log.error("notice at %s failed: %s", record.source, type(exc).__name__, exc_info=exc)
                result.dead.append(DeadLetter(record, "internal_error", type(exc).__name__))
            else:
                result.applied += 1
        return result

    async def apply(self, notice: RotationNotice, *, refresh: str = "now") -> Applied:
        """A Secret Manager notice: what its event type makes wrong (RotationNotice.selection). `refresh`: "now"
        (awaited), or "beside" (the notices stream: in the background, bounded, so that the next notice stops
        serving at once)."""
        selection = notice.selection()
        if selection is None:  # a version enabled, the secret created or due for rotation: its refusals may be over
            await self.keychain.maintenance.forget_refusals(notice.identity)
            metrics.INVALIDATIONS.labels(notice.event_type).inc()
            log.info("notice %s for %s: no value changed, nothing dropped; its refusals forgotten", notice.event_type,
                     secret_label(notice.secret, self.settings.log_secret_ids))
            return Applied(0, 0, 0.0)
        applied = await self.invalidate(selection, cause=notice.event_type, notice_id=notice.notice_id,
                                        occurred_at=notice.occurred_at, refresh=refresh == "now")
        if refresh == "beside" and applied.changed:
            self.refresh_beside(selection)
        return applied

    async def invalidate(self, selection: Selection, *, cause: str, notice_id: str | None = None,
                         occurred_at: datetime | None = None, refresh: bool = True) -> Applied:
        """THE invalidation. `cause`: a notice's event type, `operator` or `reconcile` (a closed set: the metric's
        label). `refresh`: re-warm running executions' rows now (else the caller, or the leader's next maintenance
        round, does)."""
        selection = await self.keychain.maintenance.resolve(selection)  # a project named by id: its number
        drop = self.settings.rewarm_mode == "drop" and selection.kind == "secret"
        changed = await self.keychain.maintenance.invalidate(selection, notice_id=notice_id, drop=drop,
                                                             defer=self.deferred.targets)
        if changed is not None:  # each target's own store: at once if it answers, else on its own
            changed += await self.deferred.apply_now()
        lag_ms = (datetime.now(timezone.utc) - (occurred_at or datetime.now(timezone.utc))).total_seconds() * 1000
        metrics.INVALIDATIONS.labels(cause).inc()
        if changed:
            self.last_lag_ms = round(lag_ms, 1)
            metrics.INVALIDATED_ROWS.inc(changed)
            metrics.INVALIDATION_LAG_SECONDS.observe(max(0.0, lag_ms / 1000))
        refreshed = 0
        if refresh and not drop:
            refreshed = await (self.refresh(selection) if selection.kind == "secret" else self.refresh_stale())
        described = (f"secret {secret_label(selection.secret.key, self.settings.log_secret_ids)}"
                     f"{' in any project' if selection.any_project else ''}"
                     if selection.kind == "secret" else selection.describe())
        log.info("invalidation (%s%s) of %s: %s rows invalidated, %d refreshed, lag %.0f ms", cause,
                 f" {notice_id}" if notice_id else "", described,
                 "duplicate, no" if changed is None else changed, refreshed, lag_ms)
        return Applied(changed, refreshed, lag_ms)

    def refresh_beside(self, selection: Selection) -> None:
        """Refresh a secret's rows in the background, REFRESHES_IN_FLIGHT at a time; beyond REFRESHES_WAITING the
        leader's next round refreshes them (they stay stopped meanwhile: nothing stale is served)."""
        if len(self._refreshing) >= REFRESHES_WAITING:
            return

        async def refresh() -> int:
            async with self._refreshes:
                return await (self.refresh(selection) if selection.kind == "secret" else self.refresh_stale())

        task = asyncio.ensure_future(refresh())
        self._refreshing.add(task)
        task.add_done_callback(self._refreshed)

    def _refreshed(self, task: asyncio.Task[int]) -> None:
        self._refreshing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("a refresh after an invalidation failed (%s): the leader's next round refreshes its rows",
                        type(task.exception()).__name__)

    async def refresh_stale(self, limit: int = 100) -> int:
        """Refresh rows invalidated and not refreshed yet (by the CLI, another process, or an invalidation of a
        credential, an execution or everything)."""
        secrets = {s for target in self.warmer.targets for s in await target.stale_secrets(limit)}
        return sum([await self.refresh(Selection.matching(secret, {}))
                    for secret in sorted(secrets, key=lambda s: s.key)])

    async def refresh(self, selection: Selection) -> int:
        """Re-warm a secret's stale rows in every target (each secret fetched once for all of them); finished
        executions have none left."""
        async def refresh(target) -> int:
            wants = await target.stale_wants(selection)
            return (await self.warmer.warm(wants, target=target, skip_ready=False))[1]

        # side by side: every target's rows wait for the same one fetch, and come back at the same moment
        return sum(await asyncio.gather(*(refresh(target) for target in self.warmer.targets)))

    async def reconcile(self) -> int:
        """Catch notices that never arrived: compare what `latest` rows hold with the secret's latest version.
        Returns how many secrets were found behind (and invalidated)."""
        behind = 0
        maintenance = self.keychain.maintenance
        for row in await maintenance.latest_secrets_to_check(RECONCILE_BATCH):
            ref, secret = SecretRef.parse(row["ref"]), SecretIdentity.from_key(row["secret"])
            try:
                latest = await self.source.latest_version(ref)
            except SecretSourceError as exc:
                log.warning("reconcile %s: %s", secret_label(secret.key, self.settings.log_secret_ids), exc.code)
                continue
            finally:
                await maintenance.mark_checked(secret)
            changed = 0
            for version in sorted(set(row["versions"]) - {latest}):
                # Only the rows still holding the old version through `latest` or an alias (the summary may name a
                # version whose rows were rewritten since: then nothing changes, and its summary row goes).
                applied = await self.invalidate(Selection.matching(secret, {"pinned": False, "version": version}),
                                                cause="reconcile")
                changed += applied.changed or 0
            if changed:
                behind += 1
                log.warning("reconcile: %d rows of %s held an older version than latest (%s)", changed,
                            secret_label(secret.key, self.settings.log_secret_ids), latest)
        return behind

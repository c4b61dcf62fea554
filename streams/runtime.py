"""What the worker's agents, timers and HTTP endpoints share, with no faust in it: the keychain (its pool, fetcher,
rows and maintenance), NoETL's catalog, the targets, the warmer and the invalidator. Opened on first use, closed
when the worker stops. The operator's CLI invalidation (`keychain invalidate`, through the `keychain.invalidation`
entry point) opens one too, so that it takes the worker's one invalidation path to every target."""

from __future__ import annotations

import asyncio

from keychain.invalidation import Selection
from keychain.settings import load_settings
from keychain.sources import SecretManagerSource
from keychain.store import Keychain

from .catalog import Catalog
from .invalidate import Invalidator
from .settings import WorkerSettings
from .targets import open_targets
from .targets.base import Target
from .warm import Warmer


class Runtime:
    def __init__(self, settings: WorkerSettings):
        self.settings = settings
        self.keychain: Keychain | None = None
        self.targets: list[Target] = []
        self.catalog: Catalog | None = None
        self.warmer: Warmer | None = None
        self.invalidator: Invalidator | None = None
        self.bridge = None  # the rotation bridge, when this worker runs one
        self.last_sweep: dict | None = None
        self._lock = asyncio.Lock()

    async def ready(self) -> "Runtime":
        async with self._lock:
            if self.keychain is None:
                source = SecretManagerSource(self.settings)
                # A long-running worker keeps its pool open: a burst should not wait for connections.
                pool = {"pool_min_size": self.settings.pool_max_size}
                keychain = await Keychain(self.settings.model_copy(update=pool), source=source).open()
                await keychain.migrate()
                await keychain.rows.prepare()
                await keychain.fetcher.open()
                self.catalog = await Catalog.open(self.settings, keychain.pool)
                self.targets = await open_targets(self.settings, keychain)
                self.keychain = keychain
                self.warmer = Warmer(self.settings, keychain, self.catalog, self.targets)
                self.invalidator = Invalidator(self.settings, keychain, self.warmer, source)
        return self

    async def sweep(self) -> dict[str, int]:
        """The leader's sweep of every target's store, then the library's bookkeeping (fences, shared fetches, the
        negative cache, copies), which every target relies on. Rows deleted, by target."""
        swept = {target.name: await target.sweep() for target in self.targets}
        await self.keychain.maintenance.sweep_bookkeeping()
        return swept

    async def close(self) -> None:
        async with self._lock:
            if self.keychain is not None:
                await self.invalidator.close()
                await self.catalog.close()
                for target in self.targets:
                    await target.close()
                await self.keychain.close()
                self.keychain = self.warmer = self.invalidator = self.catalog = None
                self.targets = []


async def invalidate_everywhere(selection: Selection) -> int:
    """The CLI's invalidation (`keychain invalidate`, registered under the `keychain.invalidation` entry point):
    the worker's one path, to every target KEYCHAIN_TARGET names. The running worker's leader refreshes the rows it
    stopped serving at its next maintenance round (KEYCHAIN_SWEEP_INTERVAL_SECONDS). Returns rows changed."""
    runtime = Runtime(load_settings(WorkerSettings))
    try:
        await runtime.ready()
        applied = await runtime.invalidator.invalidate(selection, cause="operator", refresh=False)
        return applied.changed or 0
    finally:
        await runtime.close()

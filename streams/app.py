"""The faust app and the runtime it shares with its agents (keychain pool, Secret Manager source, targets, warmer)."""

from __future__ import annotations

import asyncio

import faust
from mode import Service

from keychain.sources import SecretManagerSource
from keychain.store import Keychain

from .catalog import Catalog
from .invalidate import Invalidator
from .settings import WorkerSettings, worker_settings_from_env
from .targets import Target, open_targets
from .targets.keychain import KeychainTarget
from .warm import Warmer


def logging_config(settings: WorkerSettings) -> dict | None:
    """JSON log lines for production (KEYCHAIN_LOG_FORMAT=json); None keeps faust's own text format."""
    if settings.log_format != "json":
        return None
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "pythonjsonlogger.json.JsonFormatter",
                                "fmt": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "json"}},
        "root": {"handlers": ["stderr"], "level": settings.log_level.upper()},
    }


def create_app(settings: WorkerSettings) -> faust.App:
    return faust.App(
        # faust's own consumer group (the rotation notices, the timers' leader): the events topic's group is
        # KEYCHAIN_APP_ID itself (streams/consumer.py), and the two speak different group protocols
        f"{settings.app_id}-control",
        # keychain-kafka = faust's aiokafka transport with a configurable fetch wait (streams/transport.py)
        broker=[f"keychain-kafka://{server.strip()}" for server in settings.kafka_bootstrap_servers.split(",")],
        key_serializer="raw",
        value_serializer="raw",
        datadir=settings.data_dir,
        store="memory://",  # the state of record is PostgreSQL; no faust tables
        autodiscover=False,
        web_enabled=True,  # served by streams.web.WebServer (registered in streams.worker)
        web_port=settings.web_port,
        web_bind=settings.web_host,
        topic_partitions=settings.topic_partitions,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=settings.broker_session_timeout_seconds,
        broker_rebalance_timeout=settings.broker_rebalance_timeout_seconds,
        broker_heartbeat_interval=settings.broker_heartbeat_interval_seconds,
        broker_commit_interval=1.0,
        producer_acks=-1,
        logging_config=logging_config(settings),
    )


class Runtime:
    """Opened on first use by whichever agent or timer needs it first; closed when the worker stops."""

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
                await keychain.prepare_fetching()
                self.catalog = await Catalog.open(self.settings, keychain.pool)
                self.targets = await open_targets(self.settings, keychain)
                self.keychain = keychain
                self.warmer = Warmer(self.settings, keychain, self.catalog, self.targets)
                self.invalidator = Invalidator(self.settings, keychain, self.warmer, source)
        return self

    async def sweep(self) -> dict[str, int]:
        """The leader's sweep of every target's store (with the library's own bookkeeping: fences, shared fetches,
        negative cache, which every target relies on). Rows deleted, by target."""
        if not any(isinstance(t, KeychainTarget) for t in self.targets):
            await self.keychain.sweep()  # our table is empty, the bookkeeping is not
        return {target.name: await target.sweep() for target in self.targets}

    async def close(self) -> None:
        async with self._lock:
            if self.keychain is not None:
                await self.catalog.close()
                for target in self.targets:
                    await target.close()
                await self.keychain.close()
                self.keychain = self.warmer = self.invalidator = self.catalog = None
                self.targets = []


settings = worker_settings_from_env()
app = create_app(settings)
runtime = Runtime(settings)


@app.service
class RuntimeCloser(Service):
    async def on_stop(self) -> None:
        await runtime.close()

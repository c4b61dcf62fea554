"""The faust app, and the runtime (streams/runtime.py) it shares with its agents, timers and HTTP endpoints."""

from __future__ import annotations

import faust
from mode import Service

from .runtime import Runtime
from .settings import WorkerSettings, worker_settings_from_env


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


settings = worker_settings_from_env()
app = create_app(settings)
runtime = Runtime(settings)


@app.service
class RuntimeCloser(Service):
    async def on_stop(self) -> None:
        await runtime.close()

"""Test-side helpers around the real worker process (streams.local) and the real broker."""

from __future__ import annotations

import os
import tempfile

from keychain.testing.stack import free_port
from streams.local import WorkerProcess, consume, create_topics, finish_event, produce, start_event

__all__ = ["Worker", "consume", "create_topics", "finish_event", "produce", "start_event", "worker_env"]

# Everything the suite's workers printed and its HTTP answers: searched for plaintext at the end of the session.
WORKERS: list[WorkerProcess] = []
HTTP_BODIES: list[str] = []


class Worker(WorkerProcess):
    def __init__(self, env: dict[str, str], **kwargs):
        super().__init__(env, **kwargs)
        WORKERS.append(self)


def worker_env(stack, settings, key_spec: str, unique: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KEYCHAIN_", "SECRET_MANAGER_"))}
    env.update(
        KEYCHAIN_DSN=settings.dsn,
        KEYCHAIN_SCHEMA=settings.schema_name,
        KEYCHAIN_KEYS=key_spec,
        SECRET_MANAGER_ENDPOINT=stack.env["SECRET_MANAGER_ENDPOINT"],
        SECRET_MANAGER_RETRY_INITIAL_SECONDS="0.01",
        SECRET_MANAGER_RETRY_MAX_SECONDS="0.1",
        KAFKA_BOOTSTRAP_SERVERS=stack.env["KAFKA_BOOTSTRAP_SERVERS"],
        KEYCHAIN_EVENTS_TOPIC=f"events-{unique}",
        KEYCHAIN_DLQ_TOPIC=f"dlq-{unique}",
        KEYCHAIN_APP_ID=f"warmer-{unique}",
        KEYCHAIN_DATA_DIR=tempfile.mkdtemp(prefix="kw-faust-"),
        KEYCHAIN_BROKER_SESSION_TIMEOUT_SECONDS="3",
        KEYCHAIN_BROKER_HEARTBEAT_INTERVAL_SECONDS="0.5",
        KEYCHAIN_TOPIC_PARTITIONS="4",
        KEYCHAIN_LOG_LEVEL="INFO",
        KEYCHAIN_WEB_PORT=str(free_port()),
        KEYCHAIN_WEB_HOST="127.0.0.1",
    )
    env.update(extra)
    return env

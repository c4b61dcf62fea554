"""Test-side helpers around the real worker process (devtools.local) and the real broker."""

from __future__ import annotations

import asyncio
import os
import time

from devtools.local import WorkerProcess, consume, create_topics, finish_event, local_worker_env, produce, start_event

__all__ = ["Worker", "consume", "create_topics", "finish_event", "process_env", "produce", "start_event", "wait_for",
           "worker_env"]

# Everything the suite's workers printed and its HTTP answers: searched for plaintext at the end of the session.
WORKERS: list[WorkerProcess] = []
HTTP_BODIES: list[str] = []


class Worker(WorkerProcess):
    def __init__(self, env: dict[str, str], **kwargs):
        super().__init__(env, **kwargs)
        WORKERS.append(self)


async def wait_for(check, timeout: float = 30.0, what: str = "condition") -> None:
    """Wait on a condition, never on a fixed sleep."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def process_env(stack, settings, key_spec: str) -> dict[str, str]:
    """Environment for a subprocess (CLI or worker) reaching this test's schema and the test server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KEYCHAIN_", "SECRET_MANAGER_"))}
    env.update(
        KEYCHAIN_DSN=settings.dsn,
        KEYCHAIN_SCHEMA=settings.schema_name,
        KEYCHAIN_KEYS=key_spec,
        SECRET_MANAGER_ENDPOINT=stack.env["SECRET_MANAGER_ENDPOINT"],
        SECRET_MANAGER_RETRY_INITIAL_SECONDS="0.01",
        SECRET_MANAGER_RETRY_MAX_SECONDS="0.1",
    )
    return env


def worker_env(stack, settings, key_spec: str, unique: str, **extra: str) -> dict[str, str]:
    """A worker on this test's own topics, consumer group and schema."""
    return local_worker_env(
        process_env(stack, settings, key_spec), f"warmer-{unique}",
        **{"KAFKA_BOOTSTRAP_SERVERS": stack.env["KAFKA_BOOTSTRAP_SERVERS"], "KEYCHAIN_EVENTS_TOPIC": f"events-{unique}",
           "KEYCHAIN_DLQ_TOPIC": f"dlq-{unique}", "KEYCHAIN_TOPIC_PARTITIONS": "4", "KEYCHAIN_LOG_LEVEL": "INFO",
           **extra},
    )

"""Run the real worker as a subprocess and talk to it through the real broker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from keychain.testing.stack import free_port
from aiokafka.admin import AIOKafkaAdminClient, NewTopic


class Worker:
    def __init__(self, env: dict[str, str]):
        self.env = env
        self.process: subprocess.Popen | None = None
        self.lines: list[str] = []
        self._ready = threading.Event()

    def start(self, timeout: float = 60) -> "Worker":
        self._ready.clear()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "streams", "worker"], env=self.env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )
        threading.Thread(target=self._read, args=(self.process,), daemon=True).start()
        if not self._ready.wait(timeout):
            self.stop()
            raise TimeoutError("worker not ready:\n" + "".join(self.lines[-40:]))
        return self

    def _read(self, process: subprocess.Popen) -> None:
        for line in process.stdout:
            self.lines.append(line)
            if "Ready" in line:
                self._ready.set()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None


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


async def create_topics(bootstrap: str, *names: str, partitions: int = 4) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(n, num_partitions=partitions, replication_factor=1) for n in names])
    finally:
        await admin.close()


async def produce(bootstrap: str, topic: str, messages: list[tuple[bytes | None, bytes]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for key, value in messages:
            await producer.send_and_wait(topic, value, key=key)
    finally:
        await producer.stop()


async def consume(bootstrap: str, topic: str, count: int, timeout: float = 30):
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None)
    await consumer.start()
    found = []
    deadline = time.monotonic() + timeout
    try:
        while len(found) < count and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for messages in batch.values():
                found.extend(messages)
    finally:
        await consumer.stop()
    return found


def start_event(execution_id: int, refs: list[str], **extra) -> tuple[bytes, bytes]:
    doc = {"event_type": "execution.started", "execution_id": execution_id,
           "credentials": [{"ref": r} for r in refs], **extra}
    return str(execution_id).encode(), json.dumps(doc).encode()


def finish_event(execution_id: int, event_type: str = "execution.completed") -> tuple[bytes, bytes]:
    return str(execution_id).encode(), json.dumps({"event_type": event_type, "execution_id": execution_id}).encode()

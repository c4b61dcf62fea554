"""`python -m streams COMMAND`: the stream worker's commands. (The demo and the local tooling: `python -m devtools`.)

Exit codes: 0 done; 1 the worker could not start (bad configuration, its database or broker unreachable: one line
naming the variable) or, for `plan`, a message the worker would dead-letter; 2 `plan` could not run (bad
configuration, unreadable input, NoETL's tables unreachable) or a usage error.
"""

import asyncio
import importlib.util
import json
import os
import sys
import time
from urllib.parse import parse_qs, urlsplit

HELP = """usage: python -m streams [-h] COMMAND ...

The keychain-warmer stream worker and its tools. Configuration: environment variables (docs/configuration.md).

commands:
  worker [FAUST OPTIONS]  run the worker (the default): warm, purge, invalidate, sweep; options are faust's
                          `worker` options (python -m streams worker --faust-help lists them)
  plan [FILE|-]           what the worker would do with one event (a JSON message; `-` or none: stdin), without
                          writing anything: the rows it would warm, what it would skip and why, or the dead letter
  schema                  the JSON schema of the execution events the worker reads (our own contract)

exit codes: 0 done; 1 the worker could not start (one line naming the variable), or `plan` found a message the
worker would dead-letter; 2 `plan` could not run, or a usage error.
"""
WORKER_HELP = """usage: python -m streams worker [FAUST OPTIONS]

Runs the worker until SIGTERM. It first checks, within {seconds:.0f} s, that its database (KEYCHAIN_DSN) and broker
(KAFKA_BOOTSTRAP_SERVERS) answer; if one does not, it prints one line naming it and exits 1. Every setting is an
environment variable (docs/configuration.md). `--faust-help` lists faust's own worker options, which are passed on.
"""
PLAN_HELP = """usage: python -m streams plan [FILE|-]

Reads one message as the worker would (a JSON execution event; `-` or no FILE: stdin) and prints, as one JSON
object, what the worker would do: the rows it would warm (and, with KEYCHAIN_TARGET=noetl or both, NoETL's rows),
what it would skip and why. Writes nothing; reads the catalog (and NoETL's credential table) when the event needs
it. Exit 0; 1 when the worker would dead-letter the message (printed as {"dead_letter": REASON, ...}); 2 when it
could not run (bad configuration, unreadable FILE, NoETL's tables unreachable).
"""
SCHEMA_HELP = """usage: python -m streams schema

Prints the JSON schema of the execution events the worker reads (our own contract; NoETL's records and Debezium's
envelopes are read too, see docs/).
"""
PREFLIGHT_SECONDS = 10.0  # how long a starting worker waits for its database and broker to answer


def wants_help(args: list[str]) -> bool:
    return any(arg in ("-h", "--help") for arg in args)


def main() -> None:
    args = sys.argv[1:]
    command = args[0] if args and not args[0].startswith("-") else "worker"
    rest = args[1:] if args and not args[0].startswith("-") else args
    if command == "worker" and rest == args and wants_help(rest):  # `python -m streams --help`
        print(HELP, end="")
        return
    if command == "worker":
        worker(rest)
    elif command == "plan":
        if wants_help(rest):
            print(PLAN_HELP, end="")
            return
        plan(rest)
    elif command == "schema":
        if wants_help(rest):
            print(SCHEMA_HELP, end="")
            return
        from .events import ExecutionEvent

        print(json.dumps(ExecutionEvent.model_json_schema(), indent=2))
    else:
        print(HELP, end="", file=sys.stderr)
        print(f"error: no command {command[:40]!r}", file=sys.stderr)
        sys.exit(2)


def worker(options: list[str]) -> None:
    if wants_help(options):
        print(WORKER_HELP.format(seconds=PREFLIGHT_SECONDS), end="")
        return
    from keychain.crypto import KeyRing
    from keychain.errors import ConfigurationError

    from .settings import worker_settings_from_env

    try:  # fail at start with one clear line, not in a restarting agent
        settings = worker_settings_from_env()  # (warns of KEYCHAIN_* variables that are not settings; kept for the app)
        KeyRing.parse(settings.keys.get_secret_value())
        if "noetl" in settings.targets and not settings.noetl_api_url:  # direct writes: NoETL's key is needed
            from .targets.noetl.kek import kek_for

            kek_for(settings)  # NoETL's key-encryption key, as NoETL's own variables name it
    except ConfigurationError as exc:
        sys.exit(f"error: {exc}")
    problem = preflight(settings)
    if problem:
        sys.exit(f"error: {problem}")
    # faust takes its event loop from F_LOOP when it is first imported: uvloop (libuv) unless the environment says
    # otherwise (F_LOOP=aio). About a tenth less CPU per event under a burst (bench/README.md).
    if importlib.util.find_spec("uvloop") is not None:
        os.environ.setdefault("F_LOOP", "uvloop")
    from .worker import app

    level = {"warning": "warn", "critical": "crit"}.get(settings.log_level.lower(), settings.log_level.lower())
    options = ["--help" if option == "--faust-help" else option for option in options]
    sys.argv = ["streams", "worker", "--loglevel", level, *options]
    app.main()


def preflight(settings) -> str | None:
    """Whether the database and the broker answer (within PREFLIGHT_SECONDS, for services starting beside the worker):
    None, or one line naming the one that does not, by its variable and address (never the DSN's password)."""
    return asyncio.run(_preflight(settings))


async def _preflight(settings) -> str | None:
    import asyncpg

    from .reachable import broker_answer, why

    deadline = time.monotonic() + PREFLIGHT_SECONDS
    while True:
        try:
            conn = await asyncpg.connect(settings.dsn, timeout=5)
            await conn.close()
            break
        except (OSError, asyncio.TimeoutError, asyncpg.CannotConnectNowError) as exc:
            if time.monotonic() > deadline:
                return f"the database (KEYCHAIN_DSN, {_address(settings.dsn)}) does not answer: {why(exc)}"
            await asyncio.sleep(0.5)
        except asyncpg.PostgresError as exc:  # it answered, and refused: a role, a password, a database name
            return f"the database (KEYCHAIN_DSN, {_address(settings.dsn)}) refused the connection: {type(exc).__name__}"
    while (error := await broker_answer(settings.kafka_bootstrap_servers, 3)) is not None:
        if time.monotonic() > deadline:
            return f"the broker (KAFKA_BOOTSTRAP_SERVERS, {settings.kafka_bootstrap_servers}) does not answer: {error}"
        await asyncio.sleep(0.5)
    return None


def _address(dsn: str) -> str:
    parts = urlsplit(dsn)
    socket_dir = parse_qs(parts.query).get("host", [None])[0]
    if socket_dir and not parts.hostname:
        return f"{socket_dir} (unix socket)"
    return parts.netloc.rpartition("@")[2] or "localhost"


def plan(args: list[str]) -> None:
    from keychain.errors import ConfigurationError
    from keychain.settings import load_settings

    from .plan import main as run_plan
    from .settings import WorkerSettings

    try:
        settings = load_settings(WorkerSettings)
    except ConfigurationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    sys.exit(run_plan(args, settings))


main()

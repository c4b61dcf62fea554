"""`python -m streams COMMAND`: worker (the faust worker, options passed on), plan, schema. (The demo and the local
tooling: `python -m devtools`.)"""

import importlib.util
import json
import os
import sys

USAGE = "python -m streams worker [faust worker options] | plan [FILE|-] | schema"


def main() -> None:
    command = sys.argv[1] if len(sys.argv) > 1 else "worker"
    if command == "worker":
        from keychain.crypto import KeyRing
        from keychain.errors import ConfigurationError

        # faust takes its event loop from F_LOOP when it is first imported: uvloop (libuv) unless the environment
        # says otherwise (F_LOOP=aio). About a tenth less CPU per event under a burst (bench/README.md).
        if importlib.util.find_spec("uvloop") is not None:
            os.environ.setdefault("F_LOOP", "uvloop")
        try:  # fail at start with a clear message, not in a restarting agent
            from .app import settings
            from .worker import app

            KeyRing.parse(settings.keys.get_secret_value())
            if "noetl" in settings.targets and not settings.noetl_api_url:  # direct writes: NoETL's key is needed
                from .targets.noetl.kek import kek_for

                kek_for(settings)  # NoETL's key-encryption key, as NoETL's own variables name it
        except ConfigurationError as exc:
            sys.exit(f"error: {exc}")

        level = {"warning": "warn", "critical": "crit"}.get(settings.log_level.lower(), settings.log_level.lower())
        sys.argv = ["streams", "worker", "--loglevel", level, *sys.argv[2:]]
        app.main()
    elif command == "plan":
        from keychain.errors import ConfigurationError
        from keychain.settings import load_settings

        from .plan import main as plan
        from .settings import WorkerSettings

        try:
            settings = load_settings(WorkerSettings)
        except ConfigurationError as exc:
            sys.exit(f"error: {exc}")
        sys.exit(plan(sys.argv[2:], settings))
    elif command == "schema":
        from .events import ExecutionEvent

        print(json.dumps(ExecutionEvent.model_json_schema(), indent=2))
    else:
        sys.exit(f"usage: {USAGE} (got {command!r})")


main()

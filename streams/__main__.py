"""`python -m streams COMMAND`: worker (the faust worker, options passed on), plan, demo, schema, pubsub-init,
produce-demo."""

import argparse
import json
import sys

USAGE = "python -m streams worker [faust worker options] | plan [FILE|-] | demo | schema | pubsub-init | produce-demo"


def main() -> None:
    command = sys.argv[1] if len(sys.argv) > 1 else "worker"
    if command == "worker":
        from keychain.crypto import KeyRing
        from keychain.errors import ConfigurationError

        try:  # fail at start with a clear message, not in a restarting agent
            from .app import settings
            from .worker import app

            KeyRing.parse(settings.keys.get_secret_value())
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
    elif command == "demo":
        from .demo import main as demo

        demo()
    elif command == "schema":
        from .events import ExecutionEvent

        print(json.dumps(ExecutionEvent.model_json_schema(), indent=2))
    elif command in ("pubsub-init", "produce-demo"):
        from .settings import worker_settings_from_env

        from .sample import produce_samples, pubsub_init

        parser = argparse.ArgumentParser(prog=f"python -m streams {command}")
        if command == "pubsub-init":
            parser.add_argument("--topic", default="secret-manager-events", help="Secret Manager notification topic")
            args = parser.parse_args(sys.argv[2:])
            pubsub_init(worker_settings_from_env(), args.topic)
        else:
            parser.add_argument("--ref", default="projects/test-project/secrets/openai-api-key/versions/latest")
            parser.add_argument("--executions", type=int, default=10)
            parser.add_argument("--interval", type=float, default=5.0)
            args = parser.parse_args(sys.argv[2:])
            produce_samples(worker_settings_from_env(), args.ref, args.executions, args.interval)
    else:
        sys.exit(f"usage: {USAGE} (got {command!r})")


main()

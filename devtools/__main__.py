"""`python -m devtools COMMAND`: demo, stack, pubsub-init, produce-demo, configuration."""

import argparse
import sys

USAGE = ("python -m devtools demo | stack | pubsub-init [--topic T] | produce-demo [--ref REF ...] | configuration")


def main() -> None:
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command == "demo":
        from .demo import main as demo

        demo()
    elif command == "stack":
        from .stack import main as stack

        stack()
    elif command == "configuration":
        from .configuration import main as configuration

        configuration()
    elif command in ("pubsub-init", "produce-demo"):
        from streams.settings import worker_settings_from_env

        from .sample import produce_samples, pubsub_init

        parser = argparse.ArgumentParser(prog=f"python -m devtools {command}")
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

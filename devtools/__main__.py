"""`python -m devtools COMMAND`: development and demo tooling (not installed with the library or the worker)."""

import argparse
import sys


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="python -m devtools",
        description="Development and demo tooling for keychain-warmer: local services, the demo, sample traffic.")
    commands = top.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands.add_parser(
        "demo", help="the whole system on local services, end to end (`make demo`)",
        description="Starts PostgreSQL, the Kafka-protocol broker, the Pub/Sub emulator (when installed) and the Secret "
                    "Manager test server, runs the worker against NoETL-shaped executions, a rotation, purges and a "
                    "sweep, stops everything it started (also on Ctrl-C or SIGTERM) and prints its figures as the "
                    "last line (JSON).")
    stack = commands.add_parser(
        "stack", help="start the local services and print `export` lines that reach them (`make stack`)",
        description="Starts the local services and prints only `export NAME=value` lines on stdout (messages go to "
                    "stderr): usable as `source <(python -m devtools stack --detach)`. Also creates the Pub/Sub "
                    "notification topic and the worker's rotation subscription, and exports what a worker started "
                    "by hand needs to be quick on the local broker. In the foreground it runs until Ctrl-C or "
                    "SIGTERM; with --detach it keeps running in the background: `kill $LOCAL_STACK_PID` stops "
                    "every service it started.")
    stack.add_argument("--detach", action="store_true", help="print the exports and return, services left running")
    commands.add_parser("configuration", help="print the configuration reference (docs/configuration.md)",
                        description="Prints docs/configuration.md, generated from the settings' own descriptions.")
    pubsub = commands.add_parser("pubsub-init", help="create the notification topic and the rotation subscription",
                                 description="Creates, if missing, the Pub/Sub topic Secret Manager notifies and the "
                                             "subscription KEYCHAIN_ROTATION_SUBSCRIPTION (PUBSUB_EMULATOR_HOST for the "
                                             "emulator).")
    pubsub.add_argument("--topic", default="secret-manager-events", help="Secret Manager notification topic")
    secret = commands.add_parser(
        "add-secret", help="add a version to a secret of the Secret Manager test server (SECRET_MANAGER_ENDPOINT)",
        description="Creates the secret when it is missing and adds VALUE as its newest version, through the official "
                    "client; prints the version's name.")
    secret.add_argument("secret_id", metavar="SECRET_ID")
    secret.add_argument("value", metavar="VALUE")
    secret.add_argument("--location", help="a regional secret's location (europe-west1, ...)")
    start = commands.add_parser(
        "start-execution", help="produce one execution-start event naming secrets (KEYCHAIN_EVENTS_TOPIC)",
        description="Produces {\"event_type\": \"execution.started\", \"execution_id\": ID, \"credentials\": "
                    "[{\"ref\": REF}, ...]}: the worker warms each REF under its own name for that execution.")
    start.add_argument("execution_id", metavar="EXECUTION_ID", type=int)
    start.add_argument("refs", metavar="REF", nargs="+", help="projects/P/secrets/S[/versions/V]")
    produce = commands.add_parser("produce-demo", help="produce sample execution events forever (docker compose)",
                                  description="Starts and finishes sample executions reading one secret, in rounds.")
    produce.add_argument("--ref", default="projects/test-project/secrets/openai-api-key/versions/latest",
                         help="the secret every execution reads")
    produce.add_argument("--executions", type=int, default=10, help="executions per round")
    produce.add_argument("--interval", type=float, default=5.0, help="seconds between a round's start and finish")
    return top


def main() -> None:
    args = parser().parse_args()
    if args.command == "demo":
        from .demo import main as demo

        demo()
    elif args.command == "stack":
        from .stack import main as stack

        stack(detach=args.detach)
    elif args.command == "configuration":
        from .configuration import main as configuration

        configuration()
    elif args.command == "add-secret":
        import os

        from .sample import add_secret

        endpoint = os.environ.get("SECRET_MANAGER_ENDPOINT")
        if not endpoint:
            sys.exit("error: SECRET_MANAGER_ENDPOINT is not set (source <(make -s stack) sets it)")
        print(add_secret(endpoint, os.environ.get("GOOGLE_CLOUD_PROJECT", "test-project"), args.secret_id,
                         args.value, args.location))
    else:
        from keychain.errors import ConfigurationError
        from keychain.settings import load_settings
        from streams.settings import WorkerSettings

        from .sample import produce_samples, pubsub_init, start_execution

        try:
            settings = load_settings(WorkerSettings)
        except ConfigurationError as exc:
            sys.exit(f"error: {exc}")
        if args.command == "pubsub-init":
            pubsub_init(settings, args.topic)
        elif args.command == "start-execution":
            start_execution(settings, args.execution_id, args.refs)
        else:
            produce_samples(settings, args.ref, args.executions, args.interval)


main()

"""`python -m streams worker [faust options]` runs the worker; `python -m streams schema` prints the event schema."""

import json
import sys


def main() -> None:
    command = sys.argv[1] if len(sys.argv) > 1 else "worker"
    if command == "schema":
        from .events import ExecutionEvent

        print(json.dumps(ExecutionEvent.model_json_schema(), indent=2))
        return
    if command != "worker":
        sys.exit(f"usage: python -m streams worker [faust worker options] | schema (got {command!r})")
    from .app import settings
    from .worker import app

    sys.argv = ["streams", "worker", "--loglevel", settings.log_level.lower(), *sys.argv[2:]]
    app.main()


main()

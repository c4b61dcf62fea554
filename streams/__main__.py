"""`python -m streams worker [faust options]` runs the worker; `demo` plays the demo; `schema` prints the event schema."""

import json
import sys


def main() -> None:
    command = sys.argv[1] if len(sys.argv) > 1 else "worker"
    if command == "demo":
        from .demo import main as demo

        demo()
        return
    if command == "schema":
        from .events import ExecutionEvent

        print(json.dumps(ExecutionEvent.model_json_schema(), indent=2))
        return
    if command != "worker":
        sys.exit(f"usage: python -m streams worker [faust worker options] | demo | schema (got {command!r})")
    from .app import settings
    from .worker import app

    level = {"warning": "warn", "critical": "crit"}.get(settings.log_level.lower(), settings.log_level.lower())
    sys.argv = ["streams", "worker", "--loglevel", level, *sys.argv[2:]]
    app.main()


main()

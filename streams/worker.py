"""The worker: the app with every agent, timer and service registered (`faust -A streams.worker:app worker`)."""

from . import agents, rotation  # noqa: F401  (registering them on the app is the import's purpose)
from .app import app
from .web import WebServer

app.web_server(WebServer)

__all__ = ["app"]

"""The worker: the app with every agent, timer and service registered (`faust -A streams.worker:app worker`)."""

from . import agents  # noqa: F401  (registering its agents, timers and services on the app is the purpose)
from .app import app
from .web import WebServer

app.web_server(WebServer)

__all__ = ["app"]

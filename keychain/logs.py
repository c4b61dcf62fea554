"""Logging set-up shared by the CLI and the worker: text for people, JSON lines for production."""

from __future__ import annotations

import hashlib
import logging
import sys

from pythonjsonlogger.json import JsonFormatter

from .settings import Settings

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())


def secret_label(name: str, shown: bool) -> str:
    """A secret's id or name as an INFO line shows it: itself, or (KEYCHAIN_LOG_SECRET_IDS=false) a short stable
    fingerprint, so that lines about one secret can still be told apart and matched."""
    return name if shown else "secret#" + hashlib.sha256(name.encode()).hexdigest()[:10]

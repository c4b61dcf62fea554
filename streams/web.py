"""The worker's HTTP server: /healthz, /readyz, /metrics, /stats and the admin POST /invalidate."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage
from mode import Service
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from keychain import metrics
from keychain.errors import InvalidReference
from keychain.invalidation import Selection
from keychain.model import storable_text
from keychain.refs import SecretRef

from . import metrics as worker_metrics
from .app import runtime, settings
from .durable import HeldForDeadLetters
from .reachable import broker_answer

log = logging.getLogger(__name__)


async def healthz(_: web.Request) -> web.Response:
    return web.json_response({"status": "alive"})


async def readyz(_: web.Request) -> web.Response:
    checks = {"database": await _database(), "broker": await _broker(), "pubsub": _pubsub(),
              "dead_letters": _dead_letters()}
    ready = all(state in ("ok", "not configured") for state in checks.values())
    return web.json_response({"ready": ready, "checks": checks}, status=200 if ready else 503)


async def _database() -> str:
    try:
        await runtime.ready()
        await asyncio.wait_for(runtime.keychain.pool.fetchval("SELECT 1"), 2)
        return "ok"
    except Exception as exc:
        return f"unreachable: {type(exc).__name__}"


async def _broker() -> str:
    return "ok" if await broker_answer(settings.kafka_bootstrap_servers, 2) is None else "unreachable"


def _dead_letters() -> str:
    held = HeldForDeadLetters.batches
    return "ok" if not held else f"not taken by the broker: {held} batch(es) held"


def _pubsub() -> str:
    if not settings.rotation_subscription:
        return "not configured"
    bridge = runtime.bridge
    return "ok" if bridge is not None and bridge.pulling else "not pulling"


async def metrics_page(_: web.Request) -> web.Response:
    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


def _counts(counter) -> dict[str, float]:
    return {s.labels.get("outcome") or s.labels.get("reason") or s.labels.get("cause") or s.labels.get("kind")
            or "total": s.value for metric in counter.collect() for s in metric.samples if s.name.endswith("_total")}


async def stats(_: web.Request) -> web.Response:
    await runtime.ready()
    reads = _counts(metrics.READS)
    total = sum(reads.values())
    rows = await runtime.keychain.maintenance.stats()
    return web.json_response({
        "reads": reads,
        "hit_ratio": round(reads.get("hit", 0) / total, 4) if total else None,
        "rows_by_scope_and_state": rows,
        "secret_manager_calls": _counts(metrics.SECRET_MANAGER_CALLS),
        "events": _counts(worker_metrics.EVENTS),
        "dead_letters": _counts(worker_metrics.DEAD_LETTERS),
        "invalidations": _counts(worker_metrics.INVALIDATIONS),
        "last_sweep": runtime.last_sweep,
        "last_invalidation_lag_ms": runtime.invalidator.last_lag_ms,
        "targets": list(settings.targets),
        **({"noetl": _noetl_figures()} if "noetl" in settings.targets else {}),
    }, dumps=_dumps)


def _noetl_figures() -> dict[str, float]:
    """What the warmer did for NoETL's server, counted as its rows left NoETL's table (purged or swept)."""
    rows = _counts(worker_metrics.NOETL_ROWS_SEEN)
    return {
        "rows_warmed_then_read": rows.get("warmed_read", 0),  # first uses NoETL's server served from the cache
        "rows_warmed_not_read": rows.get("warmed_unread", 0),
        "rows_noetl_wrote_itself": rows.get("server_written", 0),  # misses the warmer could not prevent
        "secret_manager_calls_saved": _counts(worker_metrics.NOETL_CALLS_SAVED).get("total", 0),
        "aliases_skipped": _counts(worker_metrics.NOETL_SKIPPED_ALIASES),
    }


def _dumps(document) -> str:
    return json.dumps(document, default=str)


async def invalidate(request: web.Request) -> web.Response:
    """Body: {"secret": "projects/P/secrets/S"} | {"version": ".../versions/N"} | {"execution_id": N} |
    {"credential": NAME} | {"all": true}. Secret and version invalidations re-warm like a notification."""
    token = settings.admin_token.get_secret_value() if settings.admin_token else ""
    if not token:
        return web.json_response({"error": "disabled: set KEYCHAIN_ADMIN_TOKEN to enable"}, status=403)
    given = request.headers.get("Authorization", "")
    scheme, _, credential = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(credential.encode(), token.encode()):
        return web.json_response({"error": "unauthorized"}, status=401, headers={"WWW-Authenticate": "Bearer"})
    try:
        what, value = _one_instruction(await request.text())
    except ValueError as bad:
        return _bad_request(str(bad))
    try:
        selection = _selection(what, value)
    except ValueError as bad:
        return _bad_request(str(bad))
    await runtime.ready()
    applied = await runtime.invalidator.invalidate(selection, cause="operator")
    return web.json_response({"invalidated": applied.changed, "refreshed": applied.refreshed})


def _selection(what: str, value: Any) -> Selection:
    """The body's instruction as an invalidation's selection; ValueError (the reason) for one it cannot be."""
    if what in ("secret", "version"):
        if not isinstance(value, str):
            raise ValueError(f"{what} must be a string")
        try:
            ref = SecretRef.parse(value)
        except InvalidReference:
            raise ValueError(f"{what} is not a Secret Manager name") from None
        if what == "version" and not ref.pinned:
            raise ValueError("version must name a version number")
        # a secret: every row of it (whatever version the reference names); a version: that version's rows
        return Selection.of(secret=ref.secret_name if what == "secret" else ref)
    if what == "execution_id":
        if not (isinstance(value, int) and not isinstance(value, bool) and 0 < value < 2**63):
            raise ValueError("execution_id must be a positive 64-bit integer")
        return Selection.of(execution_id=value)
    if what == "credential":
        if not (isinstance(value, str) and value):
            raise ValueError("credential must be a non-empty string")
        try:
            return Selection.of(credential=storable_text(value))
        except ValueError as bad:
            raise ValueError(f"credential {bad}") from None
    if what == "all" and value is True:
        return Selection.of(everything=True)
    raise ValueError("unknown instruction")


def _one_instruction(text: str) -> tuple[str, Any]:
    """The body's one key and its value. ValueError (with the reason) for anything else: not JSON, nested too deep,
    duplicate keys (no "last one wins"), more or fewer than one key."""

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            raise ValueError("duplicate keys")
        return dict(pairs)

    try:
        body = json.loads(text, object_pairs_hook=no_duplicates)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except json.JSONDecodeError:
        raise ValueError("not JSON") from None
    if not isinstance(body, dict) or len(body) != 1:
        raise ValueError("the body must be a JSON object with exactly one key")
    return next(iter(body.items()))


def _bad_request(reason: str = "unknown instruction") -> web.Response:
    return web.json_response({"error": f'{reason}: give one of {{"secret": "projects/P/secrets/S"}}, {{"version": '
                              '"projects/P/secrets/S/versions/N"}, {"execution_id": N}, {"credential": NAME}, '
                              '{"all": true}'}, status=400)


def build_application() -> web.Application:
    application = web.Application()
    application.add_routes([
        web.get("/healthz", healthz),
        web.get("/readyz", readyz),
        web.get("/metrics", metrics_page),
        web.get("/stats", stats),
        web.post("/invalidate", invalidate),
    ])
    return application


class UnreadableRequests(logging.Filter):
    """aiohttp logs a request it cannot read (a request line over 8 KB, a malformed header, ...) at ERROR with a
    traceback: one brief WARNING line instead, naming the kind of fault, never the request (a URL may carry a
    token)."""

    def filter(self, record: logging.LogRecord) -> bool:
        fault = record.exc_info[1] if record.exc_info else None
        if isinstance(fault, BadHttpMessage):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg, record.args = "HTTP: refused a request it could not read (%s)", (type(fault).__name__,)
            record.exc_info, record.exc_text = None, None
        return True


class WebServer(Service):
    """Registered with `app.web_server`: faust starts it with the worker."""

    _runner: web.AppRunner | None = None

    async def on_start(self) -> None:
        logging.getLogger("aiohttp.server").addFilter(UnreadableRequests())
        self._runner = web.AppRunner(build_application(), access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, settings.web_host, settings.web_port).start()
        log.info("HTTP on %s:%d (/healthz /readyz /metrics /stats /invalidate)", settings.web_host, settings.web_port)

    async def on_stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

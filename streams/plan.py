"""What a start event asks for, and `python -m streams plan [FILE|-]`: the dry run that answers an operator's
"why was my secret not warm?".

The command reads one message value (any envelope the worker accepts), looks the playbook up in NoETL's catalog when
the event carries none (it needs KEYCHAIN_DSN, or KEYCHAIN_CATALOG_DSN, only then), and prints ONE JSON object:
  {"event": "start"|"finish"|"ignored", "execution_id": N,
   "rows": [{"name": NAME, "scope": "execution"|"global"|"session", "refs": {FIELD: REF}}],
   "skipped": [{"where": WHERE, "reason": REASON}]}
A single-valued row's only field is "". Exit 0; a message the worker would dead-letter prints
{"dead_letter": REASON, "detail": DETAIL} and exits 1.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from typing import Any

import asyncpg

from . import metrics
from .catalog import Catalog
from .events import BadEvent, ExecutionEvent, parse_event
from .resolve import Plan, resolve
from .settings import WorkerSettings

log = logging.getLogger(__name__)


async def plan_start(event: ExecutionEvent, catalog: Catalog | None, settings: WorkerSettings) -> Plan:
    """Resolve a start event against its playbook: the event's own, or the catalog's. BadEvent when it is bad."""
    return plan_of(event, await catalog.playbook_for(event) if catalog is not None else None, settings)


def plan_of(event: ExecutionEvent, playbook: dict[str, Any] | None, settings: WorkerSettings) -> Plan:
    """plan_start, its playbook in hand (a batch looks its playbooks up at once: Catalog.playbooks_for)."""
    try:
        plan = resolve(event, playbook, project=settings.google_cloud_project)
    except RecursionError:
        raise BadEvent("invalid_event", "the playbook is nested too deeply") from None
    for skip in plan.skipped:
        metrics.SKIPPED_DECLARATIONS.labels(skip.reason).inc()
    if plan.skipped:
        log.info("execution %d: %d declaration(s) not warmed (%s)", event.execution_id, len(plan.skipped),
                 ", ".join(sorted({s.reason for s in plan.skipped})))
    return plan


async def dry_run(value: bytes, settings: WorkerSettings) -> dict[str, Any]:
    """The plan of one message value, as the command prints it. Raises BadEvent for a dead letter."""
    event = parse_event(None, value, max_bytes=settings.max_event_bytes)
    answer: dict[str, Any] = {"event": event.kind, "execution_id": event.execution_id, "rows": [], "skipped": []}
    if event.kind != "start":
        return answer
    catalog = None
    if Catalog.needed_for(event):
        pool = await asyncpg.create_pool(settings.catalog_dsn or settings.dsn, min_size=0, max_size=1)
        catalog = Catalog(settings, pool, owns_pool=True)
    try:
        plan = await plan_start(event, catalog, settings)
    finally:
        if catalog is not None:
            await catalog.close()
    answer["rows"] = [want.as_json() for want in plan.wants]
    answer["skipped"] = [skip.as_json() for skip in plan.skipped]
    return answer


def main(argv: list[str], settings: WorkerSettings) -> int:
    source = argv[0] if argv else "-"
    try:
        value = sys.stdin.buffer.read() if source == "-" else open(source, "rb").read()
    except OSError as exc:
        print(f"error: cannot read {source}: {exc.strerror}", file=sys.stderr)
        return 2
    try:
        answer = asyncio.run(dry_run(value, settings))
    except BadEvent as bad:
        print(json.dumps({"dead_letter": bad.reason, "detail": bad.detail}))
        return 1
    except (OSError, asyncpg.PostgresError) as exc:
        print(f"error: cannot read NoETL's catalog: {type(exc).__name__}", file=sys.stderr)
        return 2
    print(json.dumps(answer))
    return 0

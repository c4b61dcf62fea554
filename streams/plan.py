"""What a start event asks of each target, and `python -m streams plan [FILE|-]`: the dry run that answers an
operator's "why was my secret not warm?".

The command reads one message value (any envelope the worker accepts), looks the playbook up in NoETL's catalog when
the event carries none (it needs KEYCHAIN_DSN, or KEYCHAIN_CATALOG_DSN, only then), and prints ONE JSON object:
  {"event": "start"|"finish"|"ignored", "execution_id": N,
   "rows": [{"name": NAME, "scope": "execution"|"global"|"session", "refs": {FIELD: REF}}],
   "skipped": [{"where": WHERE, "reason": REASON}],
   "noetl": {"rows": [{"cache_key": KEY, "alias": ALIAS, "refs": {FIELD: REF}}], "skipped": [...]}}
`rows` and `skipped` are the keychain target's (when KEYCHAIN_TARGET is keychain or both), `noetl` the noetl
target's (noetl or both: the cache keys NoETL's server will look under; an alias that `noetl.credential` shadows is
skipped `credential_table`, which needs NoETL's database). A single-valued row's only field is "". Exit 0; a
message the worker would dead-letter prints {"dead_letter": REASON, "detail": DETAIL} and exits 1.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from typing import Any

import asyncpg

from .catalog import Catalog
from .events import BadEvent, ExecutionEvent, parse_event
from .resolve import Skip, resolve
from .settings import WorkerSettings
from .targets.base import Target, TargetPlan

log = logging.getLogger(__name__)


def plans_of(event: ExecutionEvent, playbook: dict[str, Any] | None, targets: list[Target]) -> list[TargetPlan]:
    """Each target's plan of a start event, its playbook in hand (the event's own, or the catalog's). BadEvent when
    the event is bad."""
    try:
        plans = [target.plan(event, playbook) for target in targets]
    except RecursionError:
        raise BadEvent("invalid_event", "the playbook is nested too deeply") from None
    reasons = sorted({s.reason for plan in plans for s in plan.skipped})
    if reasons:
        log.info("execution %d: %d declaration(s) not warmed (%s)", event.execution_id,
                 sum(len(plan.skipped) for plan in plans), ", ".join(reasons))
    return plans


async def dry_run(value: bytes, settings: WorkerSettings) -> dict[str, Any]:
    """The plans of one message value, as the command prints them. Raises BadEvent for a dead letter."""
    from .targets.noetl.aliases import noetl_plan
    from .targets.noetl.table import noetl_statements, shadowed_aliases

    event = parse_event(None, value, max_bytes=settings.max_event_bytes)
    answer: dict[str, Any] = {"event": event.kind, "execution_id": event.execution_id}
    if "keychain" in settings.targets:
        answer.update(rows=[], skipped=[])
    if "noetl" in settings.targets:
        answer["noetl"] = {"rows": [], "skipped": []}
    if event.kind != "start":
        return answer
    pool = None
    if Catalog.needed_for(event) or "noetl" in settings.targets:
        pool = await asyncpg.create_pool(settings.catalog_dsn or settings.dsn, min_size=0, max_size=1)
    try:
        playbook = None
        if Catalog.needed_for(event):
            playbook = await Catalog(settings, pool).playbook_for(event)
        try:
            playbook = playbook if playbook is not None else (event.playbook if isinstance(event.playbook, dict)
                                                              else None)
            if "keychain" in settings.targets:
                plan = resolve(event, playbook, project=settings.google_cloud_project,
                               server_region=settings.noetl_server_region)
                answer.update(rows=[w.as_json() for w in plan.wants], skipped=[s.as_json() for s in plan.skipped])
            if "noetl" in settings.targets:
                plan = noetl_plan(event, playbook, project=settings.noetl_project,
                                  server_region=settings.noetl_server_region)
                shadowed = await shadowed_aliases(pool, noetl_statements(settings.catalog_schema),
                                                  {w.alias for w in plan.wants})
                plan.skipped += [Skip(w.alias, "credential_table") for w in plan.wants if w.alias in shadowed]
                answer["noetl"] = {"rows": [w.as_json() for w in plan.wants if w.alias not in shadowed],
                                   "skipped": [s.as_json() for s in plan.skipped]}
        except RecursionError:
            raise BadEvent("invalid_event", "the playbook is nested too deeply") from None
    finally:
        if pool is not None:
            await pool.close()
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
        print(f"error: cannot read NoETL's tables: {type(exc).__name__}", file=sys.stderr)
        return 2
    print(json.dumps(answer))
    return 0

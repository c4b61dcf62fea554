"""Execution lifecycle events, in every envelope the worker accepts (topic KEYCHAIN_EVENTS_TOPIC).

Three envelopes, told apart by their fields, all normalised into one `ExecutionEvent`:
- our own contract: `{event_type, execution_id, workload, credentials, playbook, catalog_id}`
  (`python -m streams schema` prints its JSON Schema);
- NoETL's own event record, the row of `noetl.event` as its outbox or a change-data-capture connector publishes it:
  `{event_id, execution_id, catalog_id, event_type, node_name, status, context, result, meta, created_at, ...}`.
  The start record carries the workload in `context.workload` (NoETL's Rust server) or `context.result.workload`
  (its Python engine) and the playbook path in `context.path` / `context.result.playbook_path`; never the playbook,
  which is read from NoETL's catalog by `catalog_id` (streams/catalog.py);
- a Debezium change event of such a row: `{op, before, after, source, ...}`, with or without the JSON converter's
  `{schema, payload}` wrapper. `op` c (insert) and r (snapshot read) carry a new row; other operations are ignored.
  Debezium writes `jsonb` columns as JSON strings and `timestamp` columns as epoch microseconds: both are parsed.

Event types outside START_EVENTS and FINISH_EVENTS (NoETL writes dozens per execution: `command.issued`,
`step.enter`, `call.done`, ...) are `ignored`, never dead-lettered.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from keychain.model import storable_text

START_EVENTS = frozenset({
    "playbook_started", "playbook.started", "playbook.initialized",
    "workflow.initialized", "workflow_initialized", "execution.started",
})
FINISH_EVENTS = frozenset({
    "playbook.completed", "playbook.failed", "playbook_completed", "playbook_failed",
    "workflow.completed", "workflow.failed", "playbook.cancelled", "playbook_cancelled",
    "execution.completed", "execution.failed", "execution.cancelled",
})
# Debezium operations that carry a newly written row; updates, deletes and truncates say nothing about a start.
_DEBEZIUM_NEW_ROW = frozenset({"c", "r"})
# Columns only NoETL's event record has: a document with one of them is a NoETL record (its workload is read from
# `context`/`result`, and a record that carries none has nothing to resolve).
_NOETL_RECORD_FIELDS = frozenset({"event_id", "context", "result", "node_name", "node_type", "parent_event_id"})

Kind = Literal["start", "finish", "ignored"]


class BadEvent(Exception):
    """An event that cannot be processed. `reason` is a short stable code (DLQ header, metric label)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


StorableText = Annotated[str, AfterValidator(storable_text)]


class CredentialSpec(BaseModel):
    """A secret the execution will use. Stored under `name` when given, else under the rendered reference."""

    model_config = ConfigDict(extra="ignore")
    ref: StorableText = Field(min_length=1, max_length=2048, description="Secret Manager reference, may be a template")
    name: StorableText | None = Field(default=None, min_length=1, max_length=1024)
    scope: Literal["execution", "local", "global"] = "execution"


class ExecutionEvent(BaseModel):
    model_config = ConfigDict(extra="ignore")
    event_type: str = Field(min_length=1, max_length=100)
    execution_id: int = Field(gt=0, lt=2**63, description="A number or a decimal string (NoETL writes both)")
    occurred_at: datetime | None = None
    workload: dict[str, Any] | None = Field(
        default_factory=dict,
        description="Overrides the playbook's workload. None: the record carries no workload (nothing to resolve)",
    )
    credentials: list[CredentialSpec] = Field(default_factory=list, max_length=1000)
    playbook: str | dict[str, Any] | None = Field(
        default=None, description="The playbook's catalog path, or the playbook document (NoETL's form)"
    )
    catalog_id: int | None = Field(default=None, gt=0, lt=2**63, description="The playbook's row in NoETL's catalog")
    parent_execution_id: int | None = Field(
        default=None, gt=0, lt=2**63, description="The execution that started this one (NoETL's sub-playbooks)")
    playbook_version: int | None = Field(default=None, ge=0, lt=2**31, description="With a path: this version")

    @property
    def kind(self) -> Kind:
        if self.event_type in START_EVENTS:
            return "start"
        return "finish" if self.event_type in FINISH_EVENTS else "ignored"

    @property
    def is_start(self) -> bool:
        return self.kind == "start"

    @property
    def is_finish(self) -> bool:
        return self.kind == "finish"

    @property
    def playbook_path(self) -> str | None:
        return self.playbook if isinstance(self.playbook, str) else None


def parse_event(key: bytes | None, value: bytes | None, *, max_bytes: int) -> ExecutionEvent:
    if value is None:
        try:
            keyed = _key_execution_id(key)
        except BadEvent:
            keyed = None
        if keyed and keyed < 2**63:  # a tombstone (Debezium writes one after a delete): nothing to warm or purge
            return ExecutionEvent(event_type="tombstone", execution_id=keyed)
        raise BadEvent("empty", "the message has no value")
    if len(value) > max_bytes:
        raise BadEvent("too_large", f"{len(value)} bytes, more than KEYCHAIN_MAX_EVENT_BYTES={max_bytes}")
    document = _json(value, "the value")
    if not isinstance(document, dict):
        raise BadEvent("invalid_event", "the value must be a JSON object")
    flat = _flatten(_unwrap(document))
    try:
        event = ExecutionEvent.model_validate(flat)
    except ValidationError as exc:
        # Locations and messages only: the offending input may hold anything.
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5])
        raise BadEvent("invalid_event", problems) from None
    keyed = _key_execution_id(key)
    if keyed is not None and keyed != event.execution_id:
        raise BadEvent("key_mismatch",
                       "the message key must name the event's execution, so that its events stay ordered")
    return event


# --- envelopes --------------------------------------------------------------------------------------------------
def _unwrap(document: dict[str, Any]) -> dict[str, Any]:
    """The record inside a Debezium envelope (with or without the JSON converter's wrapper), or the document."""
    if "payload" in document and "schema" in document:
        document = document["payload"]
        if not isinstance(document, dict):
            raise BadEvent("invalid_event", "a Debezium message's payload must be a JSON object")
    if "op" in document and ("after" in document or "before" in document):
        op = document["op"]
        row = document.get("after")
        if not (isinstance(op, str) and op in _DEBEZIUM_NEW_ROW):
            # A change that is not a new event row: nothing to warm or purge. Ignored, with a type of its own.
            return {"event_type": "debezium.other_operation", "execution_id": _execution_id_of(document)}
        if not isinstance(row, dict):
            raise BadEvent("invalid_event", "a Debezium create or read must carry the row in `after`")
        return row
    return document


def _execution_id_of(change: dict[str, Any]) -> Any:
    for image in (change.get("after"), change.get("before")):
        if isinstance(image, dict) and "execution_id" in image:
            return image["execution_id"]
    return None


def _flatten(record: dict[str, Any]) -> dict[str, Any]:
    """Our contract as it is; a NoETL record's start fields lifted out of its `context` and `result` columns."""
    if not _NOETL_RECORD_FIELDS & record.keys():
        if record.get("workload", {}) is None:  # our contract: no workload is an empty one
            return {**record, "workload": {}}
        return record
    event_type = record.get("event_type")
    if not (isinstance(event_type, str) and event_type in START_EVENTS):  # only a start needs more than this
        return {k: record.get(k) for k in ("event_type", "execution_id")}
    context = _json_column(record.get("context"), "context")
    result = _json_column(record.get("result"), "result")
    inner = context.get("result") if isinstance(context.get("result"), dict) else {}
    places = (context, inner, result)
    flat: dict[str, Any] = {
        "event_type": record.get("event_type"),
        "execution_id": record.get("execution_id"),
        "catalog_id": _nonzero(record.get("catalog_id")) or _nonzero(context.get("catalog_id")),
        "parent_execution_id": (_nonzero(record.get("parent_execution_id"))
                                or _nonzero(context.get("parent_execution_id"))),
        "occurred_at": _timestamp(record.get("created_at")),
        # Rust server: context.workload; Python engine: context.result.workload. A record with none (the Rust
        # server's workflow.initialized) has nothing to resolve: the execution's other start record carries it.
        "workload": next((p["workload"] or {} for p in places if "workload" in p), None),
        "playbook": next((p[k] for p in places for k in ("path", "playbook_path") if isinstance(p.get(k), str)), None),
    }
    return {k: v for k, v in flat.items() if v is not None or k == "workload"}


def _nonzero(value: Any) -> Any:
    """NoETL writes catalog_id 0 (or "0") where an event belongs to no catalog entry."""
    return None if value in (0, "0", "") else value


def _json_column(value: Any, name: str) -> dict[str, Any]:
    """A `jsonb` column: an object, a JSON string of one (Debezium), or absent."""
    if isinstance(value, str):
        value = _json(value.encode(), name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadEvent("invalid_event", f"{name} must be a JSON object")
    return value


def _timestamp(value: Any) -> Any:
    """Debezium writes `timestamp` columns as epoch microseconds; anything else is left to the model to read."""
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return datetime.fromtimestamp(value / 1_000_000, tz=timezone.utc)
        except (OverflowError, OSError, ValueError):
            raise BadEvent("invalid_event", "created_at: not a time") from None
    return value


def _key_execution_id(key: bytes | None) -> int | None:
    """The execution a message key names: a decimal id, or a JSON object holding `execution_id` (Debezium's key of
    `noetl.event`, possibly under `payload`). Absent: None. Any other key names no execution (key_mismatch)."""
    if key is None:
        return None
    text = key.strip()
    if text.isdigit() and len(text) <= 20:
        return int(text)
    if text.startswith(b"{"):
        document = _json(text, "the key")
        if isinstance(document, dict) and isinstance(document.get("payload"), dict):
            document = document["payload"]
        found = document.get("execution_id") if isinstance(document, dict) else None
        if isinstance(found, int) and not isinstance(found, bool):
            return found
        if isinstance(found, str) and found.isdigit() and len(found) <= 20:
            return int(found)
    raise BadEvent("key_mismatch", "the message key must be the execution id or an object holding it")


def _json(data: bytes, what: str) -> Any:
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadEvent("malformed_json", f"{what} is not JSON: {type(exc).__name__}") from None
    except (ValueError, RecursionError):  # JSON, but more than Python takes: a 5,000-digit number, deep nesting
        raise BadEvent("invalid_event", f"{what} holds a number too long or nesting too deep") from None

"""Execution lifecycle events: the contract for producers (topic KEYCHAIN_EVENTS_TOPIC, key = execution id).

`python -m streams schema` prints the JSON Schema of `ExecutionEvent`.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

START_EVENTS = frozenset({"execution.started", "playbook.initialized", "workflow.initialized"})
FINISH_EVENTS = frozenset({
    "execution.completed", "execution.failed", "execution.cancelled",
    "playbook.completed", "playbook.failed", "workflow.completed", "workflow.failed",
})


class BadEvent(Exception):
    """An event that cannot be processed. `reason` is a short stable code (DLQ header, metric label)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class CredentialSpec(BaseModel):
    """A secret the execution will use. Stored under `name` when given, else under the rendered reference."""

    model_config = ConfigDict(extra="ignore")
    ref: str = Field(min_length=1, max_length=2048, description="Secret Manager reference, may be a template")
    name: str | None = Field(default=None, min_length=1, max_length=1024)
    scope: Literal["execution", "local", "global"] = "execution"


class ExecutionEvent(BaseModel):
    model_config = ConfigDict(extra="ignore")
    event_type: str = Field(min_length=1, max_length=100)
    execution_id: int = Field(gt=0, lt=2**63)
    occurred_at: datetime | None = None
    workload: dict[str, Any] = Field(default_factory=dict, description="Overrides the playbook's workload")
    credentials: list[CredentialSpec] = Field(default_factory=list, max_length=1000)
    playbook: str | dict[str, Any] | None = Field(
        default=None, description="The playbook's catalog path, or the playbook document (NoETL's form)"
    )

    @property
    def is_start(self) -> bool:
        return self.event_type in START_EVENTS

    @property
    def is_finish(self) -> bool:
        return self.event_type in FINISH_EVENTS


def parse_event(key: bytes | None, value: bytes | None, *, max_bytes: int) -> ExecutionEvent:
    if value is None:
        raise BadEvent("empty", "the message has no value")
    if len(value) > max_bytes:
        raise BadEvent("too_large", f"{len(value)} bytes, more than KEYCHAIN_MAX_EVENT_BYTES={max_bytes}")
    try:
        document = json.loads(value)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadEvent("malformed_json", f"not JSON: {type(exc).__name__}") from None
    if not isinstance(document, dict):
        raise BadEvent("invalid_event", "the value must be a JSON object")
    try:
        event = ExecutionEvent.model_validate(document)
    except ValidationError as exc:
        # Locations and messages only: the offending input may hold anything.
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5])
        raise BadEvent("invalid_event", problems) from None
    if not (event.is_start or event.is_finish):
        raise BadEvent("unknown_event_type", f"event_type {event.event_type[:100]!r} is neither a start nor a finish")
    if key is not None and key != str(event.execution_id).encode():
        raise BadEvent("key_mismatch", "the message key must be the execution id, so that its events stay ordered")
    return event

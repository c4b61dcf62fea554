"""Development and demo tooling (not used by the worker): samples in NoETL's real shapes, written for this project
(not copied from NoETL), for the demo, the tests and the benchmarks. Playbooks as NoETL stores them in its catalog
(YAML text, bare templates), its event records (Rust server and Python engine), Debezium envelopes of them, and the
catalog table with NoETL's column names (NoETL owns that table; the warmer only reads it)."""

from __future__ import annotations

import json
import time
from typing import Any

# The seed's playbook written NoETL's way: bare templates (NoETL renders the workload's keys at the top level).
CACHE_SIMPLE = """\
apiVersion: noetl.io/v2
kind: Playbook
metadata:
  name: cache_simple
  path: test/cache_simple
workload:
  oauth_cred: google_oauth
  openai_secret_path: projects/1014428265962/secrets/not-this-one/versions/1
workflow:
  - step: start
    tool:
      kind: python
      code: |
        result = {"status": "started"}
    next:
      - step: first_openai_call
  - step: first_openai_call
    tool:
      kind: http
      method: GET
      url: https://api.openai.com/v1/models
      auth:
        openai:
          type: bearer
          provider: secret_manager
          key: '{{ openai_secret_path }}'
          oauth_credential: '{{ oauth_cred }}'
    next:
      - step: second_openai_call
  - step: second_openai_call
    tool:
      kind: http
      method: GET
      url: https://api.openai.com/v1/models
      auth:
        openai:
          type: bearer
          provider: secret_manager
          key: '{{ openai_secret_path }}'
    next:
      - step: end
  - step: end
"""

# Newer playbooks: a `keychain:` section of `kind: secrets` entries (one with a map, one without), the older
# `kind: secret_manager`, and every form the warmer must recognise and skip, with its reason.
KEYCHAIN_SECRETS = """\
apiVersion: noetl.io/v2
kind: Playbook
metadata:
  name: keychain_secrets
  path: tests/keychain/secrets
workload:
  gcp_auth: google_oauth
  api_secret: projects/test-project/secrets/{mapped}/versions/latest
  pg_auth: pg_k8s
keychain:
  - name: openai_token
    kind: secrets
    provider: gcp
    auth: '{{{{ gcp_auth }}}}'
    map:
      api_key: '{{{{ api_secret }}}}'
  - name: {plain}
    kind: secrets
    provider: gcp
  - name: legacy_local
    kind: secret_manager
    scope: local
    map:
      token: '{{{{ workload.api_secret }}}}'
  - name: aws_creds
    kind: secrets
    provider: aws
    map:
      key: prod/api/key
  - name: cloud_run_token
    kind: google_id_token
    audience: https://service.example.run.app
  - name: amadeus
    kind: oauth2
    endpoint: https://test.api.amadeus.com/v1/security/oauth2/token
  - name: from_result
    kind: secrets
    provider: gcp
    scope: local
    map:
      value: '{{{{ fetch_path.result.secret }}}}'
workflow:
  - step: start
    next:
      - step: query
  - step: query
    tool:
      kind: postgres
      auth: '{{{{ pg_auth }}}}'
      query: SELECT 1
    next:
      - step: call
  - step: call
    tool:
      kind: http
      url: '{{{{ keychain.openai_token.api_key }}}}'
      auth:
        source: credential
        key: pg_k8s
    next:
      - step: token
  - step: token
    tool:
      kind: http
      auth:
        type: oauth2
        provider: secret_manager
        client_id_key: projects/test-project/secrets/{client_id}
        client_secret_key: projects/test-project/secrets/{client_secret}/versions/latest
    next:
      - step: end
  - step: end
"""


def keychain_secrets_yaml(mapped: str, plain: str, cid: str, csecret: str) -> str:
    return KEYCHAIN_SECRETS.format(mapped=mapped, plain=plain, client_id=cid, client_secret=csecret)


CATALOG_DDL = """
CREATE TABLE IF NOT EXISTS {schema}.catalog (
    catalog_id BIGINT PRIMARY KEY,
    path       TEXT NOT NULL,
    version    INTEGER NOT NULL DEFAULT 1,
    kind       TEXT NOT NULL DEFAULT 'Playbook',
    content    TEXT,
    layout     JSONB,
    payload    JSONB,
    meta       JSONB,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (path, version)
)"""


async def register(conn, schema: str, catalog_id: int, path: str, content: str, version: int = 1) -> None:
    """What NoETL's catalog register does, as far as the warmer can see: a row with the YAML text."""
    await conn.execute(CATALOG_DDL.format(schema=schema))
    await conn.execute(f"INSERT INTO {schema}.catalog (catalog_id, path, version, content) VALUES ($1, $2, $3, $4)",
                       catalog_id, path, version, content)


# --- event records (rows of noetl.event) ------------------------------------------------------------------------
_EVENT_IDS = iter(range(int(time.time() * 1000) << 12, 2**62))


def record(execution_id: int, catalog_id: int, event_type: str, *, context: Any = None, result: Any = None,
           node_name: str | None = None, status: str = "COMPLETED") -> dict[str, Any]:
    return {
        "event_id": next(_EVENT_IDS), "execution_id": execution_id, "catalog_id": catalog_id, "parent_event_id": None,
        "parent_execution_id": None, "event_type": event_type, "node_id": node_name, "node_name": node_name,
        "node_type": "step", "status": status, "context": context, "result": result,
        "meta": {"emitted_at": "2026-11-26T12:00:00+00:00", "emitter": "control_plane"}, "worker_id": None,
        "attempt": None, "created_at": "2026-11-26T12:00:00.123456+00:00",
    }


def rust_playbook_started(execution_id: int, catalog_id: int, path: str, workload: dict) -> dict[str, Any]:
    """The Rust server's start record: ids as strings in the context, the workload, the path; no playbook."""
    row = record(execution_id, catalog_id, "playbook_started", node_name=path, status="STARTED", context={
        "catalog_id": str(catalog_id), "execution_id": str(execution_id), "path": path, "workload": workload})
    row["node_id"], row["node_type"] = "playbook", "execution"
    return row


def rust_workflow_initialized(execution_id: int, catalog_id: int) -> dict[str, Any]:
    """The Rust server's second start record: step and transition counts, no workload."""
    return record(execution_id, catalog_id, "workflow.initialized", node_name="workflow", status="STARTED",
                  context={"steps": 4, "transitions": 3})


def python_playbook_initialized(execution_id: int, catalog_id: int, path: str, workload: dict) -> dict[str, Any]:
    """The Python engine's start record: {status, result: {workload, playbook_path}} in the context."""
    return record(execution_id, catalog_id, "playbook.initialized", node_name=path, status="STARTED", context={
        "status": "initialized", "result": {"workload": workload, "playbook_path": path}})


STEP_TYPES = ["command.issued", "command.claimed", "command.started", "step.enter", "call.done", "command.completed",
              "step_completed", "action_completed", "step_result", "loop.item", "loop.done", "step.exit"]


def step_records(execution_id: int, catalog_id: int, step: str) -> list[dict[str, Any]]:
    """What every step writes between start and finish: a dozen record types the warmer must ignore."""
    return [record(execution_id, catalog_id, t, node_name=step, context={"command_id": f"{execution_id}:{step}:1"},
                   result={"status": "ok", "data": {"rows": 1}}) for t in STEP_TYPES]


def finish_record(execution_id: int, catalog_id: int, event_type: str = "playbook.completed") -> dict[str, Any]:
    return record(execution_id, catalog_id, event_type, node_name="playbook", context={"status": "completed"})


# --- on the wire --------------------------------------------------------------------------------------------------
def as_message(row: dict[str, Any]) -> tuple[bytes, bytes]:
    """A record as NoETL's outbox relay publishes it: keyed by the execution id."""
    return str(row["execution_id"]).encode(), json.dumps(row).encode()


def debezium(row: dict[str, Any], *, op: str = "c", wrapped: bool = True,
             key_columns: tuple[str, ...] = ("execution_id", "event_id")) -> tuple[bytes, bytes]:
    """A Debezium change event of a `noetl.event` row: jsonb columns as JSON strings, timestamps as epoch
    microseconds, the key the table's primary key `(execution_id, event_id)` (or `message.key.columns`'); with the
    JSON converter's schema/payload wrapper or without."""
    after = dict(row)
    for column in ("context", "result", "meta"):
        if after[column] is not None:
            after[column] = json.dumps(after[column])
    after["created_at"] = int(time.time() * 1_000_000)
    change = {"before": None, "after": after, "op": op, "ts_ms": int(time.time() * 1000),
              "source": {"connector": "postgresql", "schema": "noetl", "table": "event"}}
    key = {column: row[column] for column in key_columns}
    if wrapped:
        change = {"schema": {"type": "struct", "name": "noetl.noetl.event.Envelope"}, "payload": change}
        key = {"schema": {"type": "struct", "name": "noetl.noetl.event.Key"}, "payload": key}
    return json.dumps(key).encode(), json.dumps(change).encode()

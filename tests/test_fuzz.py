"""Property-based fuzzing of the two inputs from outside: execution events and Pub/Sub notifications.
Every input either yields a valid result or a BadEvent with a known reason: never another exception."""

import json
import os

from hypothesis import HealthCheck, given, settings, strategies as st

from streams.events import BadEvent, parse_event
from streams.notices import notice_from_pubsub
from streams.resolve import SKIP_REASONS, resolve

# `make check` (FAST_TESTS=1) runs a tenth of the examples, for a quick answer; `make test` runs them all.
SCALE = 10 if os.environ.get("FAST_TESTS") else 1


def examples(n: int) -> int:
    return n // SCALE


EVENT_REASONS = {"empty", "too_large", "malformed_json", "invalid_event", "key_mismatch", "bad_template",
                 "bad_reference"}
NOTICE_REASONS = {"unknown_event_type", "invalid_notice"}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
templates = st.sampled_from([
    "{{ workload.path }}", "{{ workload.missing }}", "{{ workload.path.__class__ }}", "{% for %}",
    "projects/p1/secrets/s1", "projects/p1/secrets/s1/versions/3", "projects//secrets", "{{ 7 * 7 }}", "",
    "{{ workload.path }}/versions/2", "{{ range(10**9) | list }}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{{ 'a' | replace('a', 'aaaa') | replace('a', 'aaaa') }}", "{{ path | default('projects/p/secrets/d') }}",
])
event_types = st.sampled_from(["execution.started", "playbook.initialized", "workflow.completed",
                               "execution.cancelled", "step.started", ""]) | st.text(max_size=20)
events = st.fixed_dictionaries(
    {"event_type": event_types,
     "execution_id": st.integers(min_value=-5, max_value=2**64) | st.text(max_size=5)},
    optional={
        "workload": st.dictionaries(st.sampled_from(["path", "other"]), templates | json_values, max_size=2),
        "credentials": st.lists(st.fixed_dictionaries({"ref": templates | json_values}, optional={
            "name": st.text(max_size=5) | st.sampled_from(["nul\x00", "lone\ud800", "n" * 2000]),
            "scope": st.text(max_size=8)}),
                                max_size=3),
        "playbook": st.text(max_size=10) | st.fixed_dictionaries({}, optional={
            "workload": st.dictionaries(st.sampled_from(["path"]), templates, max_size=1),
            "keychain": st.lists(st.fixed_dictionaries({"kind": st.sampled_from(["secret_manager", "x"])}, optional={
                "name": st.text(max_size=5) | json_values, "scope": st.sampled_from(["global", "local"]),
                "map": st.dictionaries(st.text(max_size=5), templates | json_values, max_size=2) | json_values}),
                max_size=2),
            "workflow": json_values | st.lists(st.fixed_dictionaries({"tool": st.fixed_dictionaries({"auth": (
                st.dictionaries(st.text(max_size=4), st.fixed_dictionaries(
                    {"provider": st.sampled_from(["secret_manager", "x"]), "key": templates | json_values}),
                    max_size=2) | json_values)})}), max_size=3),
        }),
    },
)


def classify_event(key, value):
    try:
        plan = resolve(parse_event(key, value, max_bytes=4096))
        assert {skip.reason for skip in plan.skipped} <= SKIP_REASONS
        return "ok"
    except BadEvent as bad:
        assert bad.reason in EVENT_REASONS, bad.reason
        return bad.reason


@settings(max_examples=examples(3000), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events, st.booleans())
def test_execution_events_never_crash(document, keyed):
    key = str(document.get("execution_id")).encode() if keyed else None
    classify_event(key, json.dumps(document).encode())


anything = st.sampled_from(["secret_manager", "secrets", "gcp", "aws", "oauth2", "credential", "local", "shared",
                            "global", "{{ path }}", "projects/p/secrets/s"]) | json_values
declaration = st.dictionaries(st.sampled_from(["name", "kind", "provider", "scope", "map", "auth", "key", "source",
                                               "type", "client_id_key", "credential", "step"]), anything, max_size=6)
noetl_playbooks = st.fixed_dictionaries({}, optional={
    "workload": st.dictionaries(st.sampled_from(["path", "other"]), templates | json_values, max_size=2),
    "keychain": st.lists(declaration | json_values, max_size=3) | json_values,
    "workflow": st.lists(st.fixed_dictionaries({"step": st.text(max_size=4) | json_values, "tool": st.fixed_dictionaries(
        {}, optional={"auth": declaration | st.dictionaries(st.text(max_size=4), declaration | json_values,
                                                            max_size=2) | json_values})}), max_size=3) | json_values,
})
noetl_records = st.fixed_dictionaries(
    {"event_id": st.integers(min_value=1, max_value=2**62), "event_type": event_types | st.sampled_from(
        ["playbook_started", "workflow.initialized", "playbook_cancelled"]) | json_values,
     "execution_id": st.integers(min_value=-5, max_value=2**64) | st.text(max_size=5) | json_values},
    optional={"catalog_id": st.integers(min_value=-1, max_value=2**64) | st.text(max_size=5) | json_values,
              "context": st.fixed_dictionaries({}, optional={
                  "workload": json_values, "path": json_values, "catalog_id": json_values,
                  "result": st.fixed_dictionaries({}, optional={"workload": json_values})}) | json_values,
              "result": json_values, "created_at": st.integers() | st.text(max_size=8) | json_values},
)


@settings(max_examples=examples(2000), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(noetl_records, st.sampled_from(["plain", "debezium", "wrapped", "jsonb-strings"]), noetl_playbooks,
       st.none() | st.binary(max_size=8) | st.sampled_from([b'{"payload": {"execution_id": 5}}', b'{"x": 1}']))
def test_noetl_records_and_playbooks_never_crash(record, envelope, playbook, key):
    if envelope == "jsonb-strings":
        record = {k: json.dumps(v) if k in ("context", "result") else v for k, v in record.items()}
    if envelope in ("debezium", "wrapped"):
        record = {"op": "c", "before": None, "after": record}
    if envelope == "wrapped":
        record = {"schema": {}, "payload": record}
    try:
        event = parse_event(key, json.dumps(record).encode(), max_bytes=1 << 20)
    except BadEvent as bad:
        assert bad.reason in EVENT_REASONS, bad.reason
        return
    plan = resolve(event, playbook, project="p")
    assert {skip.reason for skip in plan.skipped} <= SKIP_REASONS


@settings(max_examples=examples(1500), deadline=None)
@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode), st.none() | st.binary(max_size=8))
def test_arbitrary_bytes_never_crash(value, key):
    classify_event(key, value)


attributes = st.fixed_dictionaries({}, optional={
    "eventType": st.sampled_from(["SECRET_VERSION_ADD", "SECRET_VERSION_DISABLE", "SECRET_DELETE", "SECRET_UPDATE",
                                  "TOPIC_CONFIGURED", "SECRET_ROTATE", "BOGUS"]) | st.text(max_size=10),
    "secretId": st.sampled_from(["projects/1/secrets/s", "projects/p/secrets/s/versions/1", "s", ""]) | st.text(max_size=40),
    "versionId": st.sampled_from(["projects/1/secrets/s/versions/2", "projects/1/secrets/t/versions/2",
                                  "projects/1/secrets/s/versions/latest"]) | st.text(max_size=40),
    "timestamp": st.sampled_from(["2026-01-01T00:00:00Z", "yesterday", "2026-01-01T00:00:00.123+02:00"]),
})


@settings(max_examples=examples(3000), deadline=None)
@given(attributes, st.binary(max_size=100) | st.sampled_from([b'{"name": "projects/1/secrets/s/versions/4"}', b"{}"]))
def test_notifications_never_crash(attrs, data):
    try:
        notice = notice_from_pubsub("m1", attrs, data, None)
    except BadEvent as bad:
        assert bad.reason in NOTICE_REASONS
        return
    if notice is not None:
        key, value = notice.to_kafka()
        assert key and json.loads(value)["notice_id"] == "m1"
        notice.match()  # every accepted notice has a defined effect

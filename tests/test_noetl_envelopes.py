"""NoETL's own shapes through the parser and the resolver (no services): its event records, Debezium envelopes of
them, its playbooks as its catalog stores them, and the plan an operator prints."""

import json

import pytest

from streams.catalog import parse_playbook
from streams.events import BadEvent, parse_event
from streams.plan import dry_run
from streams.resolve import resolve
from streams.settings import WorkerSettings

from devtools.noetl_samples import (
    CACHE_SIMPLE, as_message, debezium, finish_record, keychain_secrets_yaml, python_playbook_initialized,
    rust_playbook_started, rust_workflow_initialized, step_records,
)

EXECUTION = 507861119290048685
CATALOG = 507861000000000001
OPENAI = "projects/1014428265962/secrets/openai-api-key/versions/1"


def parse(message):
    key, value = message
    return parse_event(key, value, max_bytes=10**6)


def test_rust_start_record_carries_catalog_id_path_and_workload():
    event = parse(as_message(rust_playbook_started(EXECUTION, CATALOG, "test/cache_simple",
                                                   {"openai_secret_path": OPENAI})))
    assert event.is_start and event.execution_id == EXECUTION and event.catalog_id == CATALOG
    assert event.playbook_path == "test/cache_simple" and event.workload == {"openai_secret_path": OPENAI}


def test_python_engine_start_record_has_the_workload_under_result():
    event = parse(as_message(python_playbook_initialized(EXECUTION, CATALOG, "test/cache_simple",
                                                         {"openai_secret_path": OPENAI})))
    assert event.is_start and event.catalog_id == CATALOG and event.workload == {"openai_secret_path": OPENAI}
    assert event.playbook_path == "test/cache_simple"


def test_a_start_record_without_workload_has_nothing_to_resolve():
    event = parse(as_message(rust_workflow_initialized(EXECUTION, CATALOG)))
    assert event.is_start and event.workload is None
    plan = resolve(event, parse_playbook(CACHE_SIMPLE, None, max_bytes=10**6))
    assert plan.wants == [] and plan.skipped == []


def test_step_records_are_ignored_and_finishes_finish():
    for row in step_records(EXECUTION, CATALOG, "first_openai_call"):
        assert parse(as_message(row)).kind == "ignored"
    for kind in ("playbook.completed", "playbook.failed", "playbook_cancelled", "workflow.completed"):
        assert parse(as_message(finish_record(EXECUTION, CATALOG, kind))).is_finish


@pytest.mark.parametrize("wrapped", [True, False])
def test_debezium_change_events_and_keys(wrapped):
    row = rust_playbook_started(EXECUTION, CATALOG, "test/cache_simple", {"openai_secret_path": OPENAI})
    event = parse(debezium(row, wrapped=wrapped))
    assert event.is_start and event.catalog_id == CATALOG and event.workload == {"openai_secret_path": OPENAI}
    assert event.occurred_at is not None and event.occurred_at.year >= 2026  # epoch microseconds, parsed
    assert parse(debezium(row, op="r", wrapped=wrapped)).is_start  # a snapshot read is a row too
    assert parse(debezium(row, op="u", wrapped=wrapped)).kind == "ignored"  # an update is no new event
    # ExtractNewRecordState's flattened row is just the row, with the jsonb columns as JSON strings
    _, flat = debezium(row, wrapped=False)
    assert parse((str(EXECUTION).encode(), json.dumps(json.loads(flat)["after"]).encode())).catalog_id == CATALOG


def test_keys_that_name_another_execution_are_mismatches():
    row = finish_record(EXECUTION, CATALOG)
    for key in (str(EXECUTION + 1).encode(), json.dumps({"execution_id": EXECUTION + 1, "event_id": 1}).encode(),
                json.dumps({"payload": {"execution_id": str(EXECUTION + 1)}}).encode(), b"not-an-id"):
        with pytest.raises(BadEvent) as caught:
            parse((key, as_message(row)[1]))
        assert caught.value.reason == "key_mismatch"
    assert parse((None, as_message(row)[1])).is_finish  # no key at all is fine
    assert parse((json.dumps({"payload": {"execution_id": str(EXECUTION)}}).encode(), as_message(row)[1])).is_finish


def test_our_contract_with_a_null_workload_still_resolves_its_credentials():
    event = parse((None, json.dumps({"event_type": "execution.started", "execution_id": 3, "workload": None,
                                     "credentials": [{"ref": "projects/p/secrets/s"}]}).encode()))
    assert [w.credential_name for w in resolve(event).wants] == ["projects/p/secrets/s/versions/latest"]


def test_ids_as_decimal_strings_and_a_tombstone():
    row = finish_record(EXECUTION, CATALOG)
    row["execution_id"] = str(EXECUTION)
    assert parse(as_message(row)).execution_id == EXECUTION
    tombstone = parse_event(json.dumps({"execution_id": EXECUTION, "event_id": 9}).encode(), None, max_bytes=100)
    assert tombstone.kind == "ignored"


def test_the_seeds_playbook_written_noetls_way_resolves_from_bare_templates():
    event = parse(as_message(rust_playbook_started(EXECUTION, CATALOG, "test/cache_simple",
                                                   {"openai_secret_path": OPENAI})))
    plan = resolve(event, parse_playbook(CACHE_SIMPLE, None, max_bytes=10**6))
    assert [w.as_json() for w in plan.wants] == [{"name": OPENAI, "scope": "execution", "refs": {"": OPENAI}}]
    assert plan.wants[0].scope.execution_id == EXECUTION  # the event's workload won over the playbook's
    assert plan.skipped == []


def test_keychain_secrets_entries_and_every_skipped_form():
    playbook = parse_playbook(keychain_secrets_yaml("mapped", "plain", "cid", "csecret"), None, max_bytes=10**6)
    event = parse(as_message(python_playbook_initialized(EXECUTION, CATALOG, "tests/keychain/secrets", {})))
    plan = resolve(event, playbook, project="test-project")
    rows = {w.credential_name: w.as_json() for w in plan.wants}
    base = "projects/test-project/secrets/{}/versions/latest"
    assert rows == {
        "openai_token": {"name": "openai_token", "scope": "global", "refs": {"api_key": base.format("mapped")}},
        "plain": {"name": "plain", "scope": "global", "refs": {"": base.format("plain")}},
        "legacy_local": {"name": "legacy_local", "scope": "execution", "refs": {"token": base.format("mapped")}},
        base.format("cid"): {"name": base.format("cid"), "scope": "execution", "refs": {"": base.format("cid")}},
        base.format("csecret"): {"name": base.format("csecret"), "scope": "execution",
                                 "refs": {"": base.format("csecret")}},
    }
    assert sorted((s.where, s.reason) for s in plan.skipped) == [
        ("amadeus", "oauth2"), ("aws_creds", "other_provider"), ("call.auth", "credential_table"),
        ("cloud_run_token", "google_id_token"), ("from_result", "unresolved"), ("query.auth", "credential_table"),
    ]
    without_project = resolve(event, playbook, project=None)
    assert ("plain", "no_project") in {(s.where, s.reason) for s in without_project.skipped}


def test_a_bad_playbook_declaration_is_skipped_and_the_rest_still_warms():
    playbook = {"keychain": [{"name": "broken", "kind": "secrets", "provider": "gcp", "map": {"v": "{% for %}"}},
                             {"name": "nonref", "kind": "secret_manager", "map": {"v": "not/a/reference"}},
                             {"name": "good", "kind": "secret_manager", "map": {"v": "projects/p/secrets/s"}}]}
    event = parse(as_message(rust_playbook_started(EXECUTION, CATALOG, "x", {})))
    plan = resolve(event, playbook)
    assert [w.credential_name for w in plan.wants] == ["good"]
    assert {(s.where, s.reason) for s in plan.skipped} == {("broken", "bad_template"), ("nonref", "bad_reference")}


@pytest.mark.parametrize("content, problem", [
    ("a: &a [1]\n" + "".join(f"b{i}: &b{i} [*{'a' if i == 0 else f'b{i-1}'}, *{'a' if i == 0 else f'b{i-1}'}]\n"
                             for i in range(60)), "aliases"),
    ("x: !!python/object/apply:os.system ['true']\n", "YAML"),
    ("- just\n- a list\n", "mapping"),
    ("workload: " + "[" * 5000 + "]" * 5000, "YAML"),
    ("workload: {x: " + "y" * 2000 + "}", "larger"),
])
def test_catalog_yaml_is_parsed_safely(content, problem):
    with pytest.raises(BadEvent) as caught:
        parse_playbook(content, None, max_bytes=1000 if problem == "larger" else 10**6)
    assert caught.value.reason == "invalid_playbook"


def test_catalog_payload_is_the_fallback_when_content_is_empty():
    assert parse_playbook("", json.dumps({"workload": {"a": 1}}), max_bytes=100) == {"workload": {"a": 1}}


async def test_plan_prints_rows_and_skips_for_an_inline_playbook():
    doc = {"event_type": "execution.started", "execution_id": 7, "workload": {"p": OPENAI},
           "credentials": [{"ref": "projects/p/secrets/db", "name": "db", "scope": "global"}],
           "playbook": {"keychain": [{"name": "t", "kind": "oauth2"}],
                        "workflow": [{"step": "s", "tool": {"auth": {"o": {"provider": "secret_manager",
                                                                          "key": "{{ p }}"}}}}]}}
    answer = await dry_run(json.dumps(doc).encode(), WorkerSettings())
    assert answer == {"event": "start", "execution_id": 7, "rows": [
        {"name": "db", "scope": "global", "refs": {"": "projects/p/secrets/db/versions/latest"}},
        {"name": OPENAI, "scope": "execution", "refs": {"": OPENAI}}],
        "skipped": [{"where": "t", "reason": "oauth2"}]}
    finish = await dry_run(as_message(finish_record(EXECUTION, CATALOG))[1], WorkerSettings())
    assert finish == {"event": "finish", "execution_id": EXECUTION, "rows": [], "skipped": []}

import json

import pytest

from streams.events import BadEvent, parse_event
from streams.resolve import resolve

SEED_EVENT = {
    "event_type": "execution.started", "execution_id": 507861119290048685, "occurred_at": "2025-12-01T17:09:23Z",
    "workload": {"openai_secret_path": "projects/1014428265962/secrets/openai-api-key/versions/1",
                 "amadeus_key_path": "projects/1014428265962/secrets/amadeus-key"},
    "credentials": [{"ref": "{{ workload.openai_secret_path }}", "scope": "execution"},
                    {"ref": "projects/p1/secrets/db/versions/2", "name": "db", "scope": "global"}],
    "playbook": {
        "path": "test/cache_simple",
        "workload": {"oauth_cred": "google_oauth", "amadeus_key_path": "overridden-by-event"},
        "keychain": [{"name": "amadeus", "kind": "secret_manager", "scope": "global",
                      "map": {"client_id": "{{ workload.amadeus_key_path }}"}},
                     {"name": "ignored", "kind": "oauth2", "map": {"x": "y"}}],
        "workflow": [
            {"step": "first_openai_call", "tool": {"kind": "http", "auth": {"openai": {
                "type": "bearer", "provider": "secret_manager", "key": "{{ workload.openai_secret_path }}",
                "oauth_credential": "{{ workload.oauth_cred }}"}}}},
            {"step": "loop", "loop": {"steps": [{"tool": {"auth": {"gh": {
                "provider": "secret_manager", "key": "projects/p1/secrets/github"}}}}]}},
            {"step": "end", "tool": {"kind": "python", "auth": {}, "libs": {}, "args": {}, "code": "result = {}"}},
        ],
    },
}


def event_bytes(doc):
    return json.dumps(doc).encode()


def test_seed_event_resolves_to_named_rows():
    event = parse_event(b"507861119290048685", event_bytes(SEED_EVENT), max_bytes=10**6)
    wants = {(w.credential_name, w.scope.type): w for w in resolve(event).wants}
    openai = "projects/1014428265962/secrets/openai-api-key/versions/1"
    assert set(wants) == {
        (openai, "execution"), ("db", "global"), ("amadeus", "global"),
        ("projects/p1/secrets/github/versions/latest", "execution"),
    }
    assert wants[(openai, "execution")].scope.execution_id == 507861119290048685
    amadeus = wants[("amadeus", "global")]
    assert [(f, str(r)) for f, r in amadeus.fields] == [
        ("client_id", "projects/1014428265962/secrets/amadeus-key/versions/latest")]  # the event's workload wins


@pytest.mark.parametrize(
    "key, value, reason",
    [
        (None, b"{not json", "malformed_json"),
        (None, b"\xff\xfe", "malformed_json"),
        (None, b"[1, 2]", "invalid_event"),
        (None, event_bytes({"event_type": "execution.started"}), "invalid_event"),
        (None, event_bytes({"event_type": "execution.started", "execution_id": "abc"}), "invalid_event"),
        (None, event_bytes({"event_type": "execution.started", "execution_id": -4}), "invalid_event"),
        (b"5", event_bytes({"event_type": "execution.completed", "execution_id": 4}), "key_mismatch"),
        (None, b" " * 2000, "too_large"),
        (None, None, "empty"),
    ],
)
def test_bad_events_have_reasons(key, value, reason):
    with pytest.raises(BadEvent) as caught:
        parse_event(key, value, max_bytes=1000)
    assert caught.value.reason == reason


@pytest.mark.parametrize(
    "credentials, reason",
    [
        ([{"ref": "{{ workload.missing }}"}], "bad_template"),
        ([{"ref": "{{ workload.x.__class__.__mro__ }}"}], "bad_template"),
        ([{"ref": "{{ unclosed"}], "bad_template"),
        ([{"ref": "not-a-reference"}], "bad_reference"),
    ],
)
def test_unrenderable_templates_are_bad_events(credentials, reason):
    doc = {"event_type": "execution.started", "execution_id": 9, "workload": {"x": "y"}, "credentials": credentials}
    with pytest.raises(BadEvent) as caught:
        resolve(parse_event(None, event_bytes(doc), max_bytes=10**6))
    assert caught.value.reason == reason


def test_other_event_types_are_ignored_not_bad():
    for name in ("step.completed", "command.issued", "call.done", "x" * 100):
        event = parse_event(b"4", event_bytes({"event_type": name, "execution_id": 4}), max_bytes=10**6)
        assert event.kind == "ignored" and not event.is_start and not event.is_finish


def test_noetl_event_names_and_path_only_playbooks():
    for name in ("playbook_started", "playbook.started", "workflow_initialized", "execution.started"):
        assert parse_event(None, event_bytes({"event_type": name, "execution_id": 1}), max_bytes=10**6).is_start
    start = parse_event(None, event_bytes({"event_type": "playbook.initialized", "execution_id": 1,
                                           "playbook": "test/cache_simple"}), max_bytes=10**6)
    assert start.is_start and resolve(start).wants == [] and start.playbook_path == "test/cache_simple"
    for name in ("workflow.completed", "playbook.failed", "execution.cancelled", "playbook_cancelled",
                 "playbook_completed", "playbook_failed", "playbook.cancelled", "execution.failed"):
        assert parse_event(None, event_bytes({"event_type": name, "execution_id": 1}), max_bytes=10**6).is_finish


@pytest.mark.parametrize("template", [
    "{{ range(10**9) | list }}", "{{ 'x' * 10**9 }}", "{{ 1 / 0 }}", "{{ 1 + 'a' }}", "{{ 2 ** 100000 }}",
    "{{ workload.x * 100000000 }}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{{ 'a' | replace('a', 'aaaa') | replace('a', 'aaaa') | replace('a', 'aaaa') }}",
    "{% macro m() %}{{ m() }}{% endmacro %}{{ m() }}", "{{ lipsum(100000) }}", "{{ x.__class__ }}",
])
def test_hostile_templates_are_bad_events_not_crashes(template):
    doc = {"event_type": "execution.started", "execution_id": 9, "workload": {"x": "y"}, "credentials": [{"ref": template}]}
    with pytest.raises(BadEvent) as caught:
        resolve(parse_event(None, event_bytes(doc), max_bytes=10**6))
    assert caught.value.reason == "bad_template"


@pytest.mark.parametrize("template", [
    "{{ path }}", "{{path}}", "{{  workload.path  }}", "{{ workload.items }}", "{{ workload.number }}",
    "{{ workload.nested.path }}", "{{ workload.missing }}", "{{ missing }}", "{{ workload.path.upper }}",
    "{{ workload.keys }}", "{{ workload.path }}/x", "{{ execution_id }}",
])
def test_bare_names_are_looked_up_exactly_as_jinja_renders_them(template):
    """The fast path for NoETL's `{{ name }}` templates answers what the sandboxed render answers, or defers to it."""
    from jinja2.exceptions import UndefinedError

    from streams.resolve import _compiled, _render

    workload = {"path": "projects/p/secrets/s", "items": "projects/p/secrets/items", "number": 7,
                "nested": {"path": "projects/p/secrets/n"}, "keys": "k"}
    context = {**workload, "workload": workload, "execution_id": 12}

    def outcome(render):
        try:
            return render(template, context)
        except UndefinedError:
            return "undefined"

    assert outcome(_render) == outcome(lambda t, c: _compiled(t).render(c))

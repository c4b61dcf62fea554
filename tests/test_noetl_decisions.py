"""The noetl target decides exactly as NoETL's server decides (noetl/server v3.83.1: src/secrets/residency.rs,
src/secrets/resolver.rs, src/secrets/gcp.rs, src/services/credential.rs): residency before any fetch, the first
entry of a name, the server's project, `map: {}`, and an alias read as a credential id the way Rust parses an i64.
Fed NoETL's own shapes: its start record and a playbook as its catalog stores it. (No services, but the plan
command's, which reads NoETL's credential table.)"""

import pytest

from devtools.noetl_samples import as_message, rust_playbook_started
from streams.catalog import parse_playbook
from streams.events import parse_event
from streams.settings import WorkerSettings
from streams.targets.noetl.aliases import noetl_plan
from streams.targets.noetl.table import i64

EXECUTION, CATALOG = 507861119290048685, 507861000000000001


def start():
    key, value = as_message(rust_playbook_started(EXECUTION, CATALOG, "tests/residency", {"region_secret": "eu-key"}))
    return parse_event(key, value, max_bytes=10**6)


def plan(yaml_text: str, *, server_region: str = "", project: str | None = "my-project"):
    return noetl_plan(start(), parse_playbook(yaml_text, None, max_bytes=10**6), project=project,
                      server_region=server_region)


RESIDENCY = """\
apiVersion: noetl.io/v2
kind: Playbook
metadata: {{name: residency, path: tests/residency}}
keychain:
  - name: eu_token
    kind: secrets
    provider: gcp
    region: {region}
    residency: {policy}
    allowed_regions: {allowed}
    map:
      key: projects/p/secrets/eu-token
workflow:
  - step: start
    tool: {{kind: http, url: 'https://example.com', headers: {{Authorization: '{{{{ keychain.eu_token.key }}}}'}}}}
"""


@pytest.mark.parametrize("server, region, policy, allowed, warmed, violation", [
    ("us-east1", "europe-west1", "strict", "[]", False, False),        # denied before any fetch: not warmed
    ("us-east1", "europe-west1", "strict", "[us-east1]", True, False),  # the server's region is allowed
    ("europe-west1", "europe-west1", "strict", "[]", True, False),      # the same region
    ("", "europe-west1", "strict", "[]", False, False),                 # no server region: strict still denies
    ("us-east1", "europe-west1", "advisory", "[]", True, True),        # allowed, counted
    ("us-east1", "europe-west1", "none", "[]", True, False),           # no policy
    ("us-east1", "''", "strict", "[]", True, False),                   # no entry region: the server's own
])
def test_residency_is_decided_as_the_server_decides(server, region, policy, allowed, warmed, violation):
    result = plan(RESIDENCY.format(region=region, policy=policy, allowed=allowed), server_region=server)
    assert [w.alias for w in result.wants] == (["eu_token"] if warmed else [])
    assert [s.reason for s in result.skipped] == ([] if warmed else ["residency_denied"])
    if warmed:
        assert result.wants[0].residency_violation is violation
        assert ("residency" in result.wants[0].as_json()) is violation  # what `streams plan` prints


async def test_the_plan_command_says_a_strict_entry_is_denied(settings, noetl_db, noetl_schema, execution_id):
    """`streams plan` on NoETL's start record, the playbook in NoETL's catalog."""
    import json

    from devtools.noetl_schema import register_playbook
    from streams.plan import dry_run

    catalog_id = execution_id + 900
    await register_playbook(noetl_db, noetl_schema, catalog_id, "tests/residency",
                            RESIDENCY.format(region="europe-west1", policy="strict", allowed="[]"))
    value = json.dumps(rust_playbook_started(execution_id, catalog_id, "tests/residency", {}), default=str).encode()
    noetl_settings = settings.model_copy(update={"target": "noetl", "noetl_server_region": "us-east1",
                                                 "catalog_schema": noetl_schema, "google_cloud_project": "p"})
    answer = await dry_run(value, noetl_settings)
    assert answer["noetl"]["rows"] == []
    assert {"where": "eu_token", "reason": "residency_denied"} in answer["noetl"]["skipped"]


FIRST_WINS = """\
apiVersion: noetl.io/v2
kind: Playbook
metadata: {name: first, path: tests/first}
keychain:
  - name: api_token
    kind: secrets
    provider: aws
    map: {key: prod/api}
  - name: api_token
    kind: secrets
    provider: gcp
    map: {key: projects/p/secrets/api-token}
  - name: other
    kind: secrets
    provider: gcp
"""


def test_the_first_entry_of_a_name_wins_even_when_it_is_skipped():
    result = plan(FIRST_WINS)
    assert [w.alias for w in result.wants] == ["other"]  # never the second `api_token`: the server reads the first
    assert [(s.where, s.reason) for s in result.skipped] == [("api_token", "other_provider")]


def test_a_bare_name_takes_google_cloud_project_then_gcp_project():
    assert WorkerSettings(google_cloud_project="a", gcp_project="b").noetl_project == "a"
    assert WorkerSettings(gcp_project="b").noetl_project == "b"
    result = plan(FIRST_WINS, project=WorkerSettings(gcp_project="from-gcp-project").noetl_project)
    assert str(result.wants[0].refs[0]) == "projects/from-gcp-project/secrets/other/versions/latest"
    assert [s.reason for s in plan(FIRST_WINS, project=None).skipped] == ["other_provider", "no_project"]


def test_an_empty_map_resolves_to_an_empty_object_with_no_fetch():
    result = plan("""\
keychain:
  - name: nothing
    kind: secrets
    provider: gcp
    map: {}
""")
    assert [(w.alias, w.fields) for w in result.wants] == [("nothing", ())] and not result.skipped


@pytest.mark.parametrize("alias, parsed", [
    ("42", 42), ("+42", 42), ("-7", -7), ("9223372036854775807", 2**63 - 1), ("9223372036854775808", None),
    ("-9223372036854775808", -2**63), ("²", None), ("٣", None), (" 4", None), ("4 ", None), ("", None), ("+", None),
    ("openai_token", None),
])
def test_an_alias_is_read_as_a_credential_id_as_rust_parses_an_i64(alias, parsed):
    assert i64(alias) == parsed


async def test_the_local_key_is_read_from_noetl_encryption_key_file_without_its_trailing_newline(tmp_path):
    import base64
    import os

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from keychain.errors import ConfigurationError
    from streams.targets.noetl.kek import kek_for

    raw = os.urandom(32)
    path = tmp_path / "noetl-encryption-key"
    path.write_text(base64.b64encode(raw).decode() + "\n")  # as `kubectl create secret --from-file` mounts it
    kek = kek_for(WorkerSettings(noetl_encryption_key_file=str(path)))
    wrapped = await kek.wrap(b"k" * 32)
    assert AESGCM(raw).decrypt(wrapped.ciphertext[:12], wrapped.ciphertext[12:], None) == b"k" * 32
    with pytest.raises(ConfigurationError, match="NOETL_ENCRYPTION_KEY_FILE"):
        kek_for(WorkerSettings(noetl_encryption_key_file=str(tmp_path / "missing")))


def test_a_regional_secret_is_not_warmed_for_noetls_server_which_asks_the_global_endpoint():
    result = plan("""\
keychain:
  - name: eu_key
    kind: secrets
    provider: gcp
    map:
      key: projects/p/locations/europe-west1/secrets/eu-key
  - name: global_key
    kind: secrets
    provider: gcp
    map:
      key: projects/p/secrets/global-key
""")
    assert [w.alias for w in result.wants] == ["global_key"]
    assert [(s.where, s.reason) for s in result.skipped] == [("eu_key", "regional_secret")]


@pytest.mark.parametrize("server, region, policy, allowed, warmed, violation", [
    ("us-east1", "europe-west1", "strict", "[]", False, False),
    ("us-east1", "europe-west1", "strict", "[us-east1]", True, False),
    ("us-east1", "europe-west1", "advisory", "[]", True, True),
])
def test_our_own_table_asks_the_same_residency_gate(server, region, policy, allowed, warmed, violation):
    """With KEYCHAIN_TARGET=both a declaration NoETL's server would refuse is not warmed into our table either: it
    would be fetched from Secret Manager for nobody the gate allows."""
    from streams.resolve import resolve

    result = resolve(start(), parse_playbook(RESIDENCY.format(region=region, policy=policy, allowed=allowed), None,
                                             max_bytes=10**6), project="my-project", server_region=server)
    assert [w.credential_name for w in result.wants] == (["eu_token"] if warmed else [])
    assert ("residency_denied" in [s.reason for s in result.skipped]) is not warmed


async def test_a_strict_entry_is_fetched_for_no_target(stack, settings, keychain, sm, noetl_db, noetl_schema, unique,
                                                      execution_id):
    """KEYCHAIN_TARGET=both, a start record whose only entry NoETL's server refuses: no Secret Manager call, no row in
    either table, and `streams plan` says so for both."""
    import json

    from devtools.noetl_schema import register_playbook
    from streams.plan import dry_run

    from .noetl_harness import warm_parts
    from streams.batches import Record

    secret_id = f"eu-token-{unique}"
    sm.create_secret(secret_id)
    sm.add_version(secret_id, "eu-only")
    catalog_id = execution_id + 900
    await register_playbook(noetl_db, noetl_schema, catalog_id, "tests/residency",
                            RESIDENCY.format(region="europe-west1", policy="strict", allowed="[]").replace(
                                "projects/p/secrets/eu-token", f"projects/test-project/secrets/{secret_id}"))
    record = rust_playbook_started(execution_id, catalog_id, "tests/residency", {})
    from .conftest import make_settings

    both = make_settings(stack, settings.schema_name, settings.keys.get_secret_value(), target="both",
                         noetl_server_region="us-east1", catalog_schema=noetl_schema,
                         google_cloud_project="test-project", noetl_encryption_key="A" * 43 + "=")
    answer = await dry_run(json.dumps(record, default=str).encode(), both)
    assert answer["rows"] == [] and answer["noetl"]["rows"] == []
    assert {"where": "eu_token", "reason": "residency_denied"} in answer["skipped"]
    assert {"where": "eu_token", "reason": "residency_denied"} in answer["noetl"]["skipped"]
    warmer, _, targets = await warm_parts(both, keychain)
    try:
        result = await warmer.handle([Record(*as_message(record))])
    finally:
        for target in targets:
            await target.close()
    assert (result.started, len(result.dead)) == (1, 0)
    assert sm.access_count(secret_id, code=None) == 0
    assert await keychain.pool.fetchval("SELECT count(*) FROM keychain") == 0
    assert await noetl_db.fetchval(f"SELECT count(*) FROM {noetl_schema}.keychain") == 0

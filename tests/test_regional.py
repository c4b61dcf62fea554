"""Regional secrets (`projects/P/locations/L/secrets/S`), notices matched by project, location and id, event types
Google adds later, and Google's rule for version aliases. Notices in the shape Secret Manager publishes them (the
attributes of docs/secret-manager-notifications.md: the project by number, `versionId` the version's full name)."""

import logging
import random
from datetime import datetime, timezone

import pytest

from keychain import Keychain, SecretManagerSource
from keychain.errors import InvalidReference
from keychain.model import Provenance, Scope
from keychain.refs import SecretRef
from keychain.sources.secret_manager import build_client
from streams import metrics
from streams.invalidate import Invalidator
from streams.notices import notice_from_pubsub
from streams.resolve import Want
from streams.warm import Warmer

from .conftest import make_settings

NUMBER = "1014428265962"  # the Secret Manager test server's project number
EU, US = "europe-west1", "us-east1"


def pubsub_notice(event_type: str, secret_name: str, version: str | None = None):
    attributes = {"eventType": event_type, "secretId": secret_name, "dataFormat": "JSON_API_V1",
                  "timestamp": datetime.now(timezone.utc).isoformat()}
    if version:
        attributes["versionId"] = f"{secret_name}/versions/{version}"
    return notice_from_pubsub(f"m-{random.getrandbits(64)}", attributes, b"{}", None)


# --- references ---------------------------------------------------------------------------------------------------
def test_a_regional_reference_is_its_own_secret():
    regional = SecretRef.parse(f"projects/p/locations/{EU}/secrets/s/versions/3")
    assert (regional.project, regional.location, regional.secret, regional.version) == ("p", EU, "s", "3")
    assert regional.secret_name == f"projects/p/locations/{EU}/secrets/s" and regional.secret_id == f"{EU}/s"
    assert regional.with_version("latest").version_name == f"projects/p/locations/{EU}/secrets/s/versions/latest"
    assert SecretRef.parse(f"projects/p/locations/{EU}/secrets/s").version == "latest"
    global_ = SecretRef.parse("projects/p/secrets/s/versions/3")
    assert global_.secret_id == "s" and global_ != regional and str(global_) != str(regional)
    assert SecretRef.parse(f"projects/p/locations/{US}/secrets/s/versions/3").secret_id != regional.secret_id


@pytest.mark.parametrize("version, parsed", [
    ("prod", "prod"), ("Prod_2-b", "Prod_2-b"), ("a" * 63, "a" * 63), ("latest", "latest"), ("LATEST", "latest"),
    ("Latest", "latest"), ("7", "7"),
    ("a" * 64, None), ("new", None), ("NEW", None), ("New", None), ("1abc", None), ("_x", None), ("-x", None),
    ("0", None), ("a.b", None),
])
def test_version_aliases_follow_googles_rule(version, parsed):
    text = f"projects/p/locations/{EU}/secrets/s/versions/{version}"
    if parsed is None:
        with pytest.raises(InvalidReference):
            SecretRef.parse(text)
    else:
        assert SecretRef.parse(text).version == parsed


def test_a_regional_secret_is_fetched_from_its_locations_endpoint(monkeypatch, tmp_path):
    """Google serves a regional secret at secretmanager.L.rep.googleapis.com only. The official client is built as
    production builds it, from application default credentials (a service account key file made here: building a
    client calls nobody), and says where it would go."""
    import json

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from keychain.settings import Settings

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    account = tmp_path / "service-account.json"
    account.write_text(json.dumps({
        "type": "service_account", "project_id": "p", "private_key_id": "k1", "private_key": key,
        "client_email": "warmer@p.iam.gserviceaccount.com", "client_id": "1",
        "token_uri": "https://oauth2.googleapis.com/token"}))
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(account))
    real = Settings(secret_manager_endpoint=None)
    assert build_client(real, EU).api_endpoint == f"secretmanager.{EU}.rep.googleapis.com"
    assert build_client(real).api_endpoint == "secretmanager.googleapis.com"


# --- notices --------------------------------------------------------------------------------------------------------
def test_a_regional_notice_selects_that_location_and_project():
    notice = pubsub_notice("SECRET_VERSION_ADD", f"projects/{NUMBER}/locations/{EU}/secrets/s", "4")
    key = f"projects/{NUMBER}/locations/{EU}/secrets/s"
    assert notice.to_kafka()[0] == key.encode()  # its partition key: one secret's notices stay in order
    selection = notice.selection()
    assert (selection.secret.key, selection.added_version) == (key, "4")
    assert selection.patterns() == [{"secret": f"projects/*/locations/{EU}/secrets/s", "pinned": False},
                                    {"secret": key, "pinned": False}]


def test_an_event_type_google_adds_is_acknowledged_counted_and_logged_once(caplog):
    counted = metrics.NOTICES_NOT_FORWARDED.labels("unknown_event_type")
    before = counted._value.get()
    with caplog.at_level(logging.WARNING, logger="streams.notices"):
        for _ in range(3):
            assert pubsub_notice("SECRET_VERSION_PURGE_PLANNED", f"projects/{NUMBER}/secrets/s", "2") is None
    assert counted._value.get() == before + 3
    assert sum("SECRET_VERSION_PURGE_PLANNED" in r.getMessage() for r in caplog.records) == 1


# --- against the Secret Manager test server ---------------------------------------------------------------------------
@pytest.fixture
def regional_secrets(sm, unique):
    """One short id, four secrets: global, two locations, each with its own value."""
    secret_id = f"reg-{unique}"
    sm.create_secret(secret_id)
    sm.add_version(secret_id, "global-value-1")
    for location in (EU, US):
        sm.create_secret(secret_id, location=location)
        sm.add_version(secret_id, f"{location}-value-1", location=location)
    return secret_id


async def test_the_library_reads_a_regional_secret_through_one_client_per_location(settings, keychain,
                                                                                  regional_secrets, sm, execution_id):
    secret_id = regional_secrets  # (`keychain`: this test's schema, migrated)
    source = SecretManagerSource(settings)
    async with Keychain(settings, source=source) as keychain:
        for location, name in ((EU, "eu"), (EU, "eu-again"), (US, "us")):
            lookup = await keychain.get_or_fetch(
                name, f"projects/test-project/locations/{location}/secrets/{secret_id}", execution_id=execution_id)
            assert lookup.value == f"{location}-value-1"
        plain = await keychain.get_or_fetch("global", f"projects/test-project/secrets/{secret_id}",
                                            execution_id=execution_id)
        assert plain.value == "global-value-1"
        assert set(source._clients) == {EU, US, None}  # one client per location, made on first use
    assert sm.access_count(secret_id, location=EU) == 1 and sm.access_count(secret_id, location=US) == 1
    assert sm.access_count(secret_id) == 1  # the global secret's own


@pytest.fixture
async def warm_parts(stack, settings, keychain, key_spec):
    tuned = make_settings(stack, settings.schema_name, key_spec, warm_deadline_seconds=5.0)
    warmer = Warmer(tuned, keychain)
    return warmer, Invalidator(tuned, keychain, warmer, SecretManagerSource(tuned))


async def test_a_notice_reaches_only_the_secret_it_names(warm_parts, keychain, sm, regional_secrets, execution_id):
    """A notice for `s` in europe-west1 leaves the global `s`, `s` in us-east1 and `s` of another project alone;
    and the other way round."""
    warmer, invalidator = warm_parts
    secret_id = regional_secrets
    names = {"global": f"projects/test-project/secrets/{secret_id}",
             EU: f"projects/test-project/locations/{EU}/secrets/{secret_id}",
             US: f"projects/test-project/locations/{US}/secrets/{secret_id}"}
    await warmer.warm([Want(key, Scope.of(execution_id=execution_id), ((None, SecretRef.parse(name)),))
                       for key, name in names.items()])
    other = SecretRef.parse(f"projects/other-project/secrets/{secret_id}")  # another project's secret of that id
    await keychain.put("other", "other-value-1", execution_id=execution_id,
                       sources=[Provenance(other, f"projects/555/secrets/{secret_id}/versions/1")])

    async def values(keys=("global", EU, US, "other")):
        return {key: (await keychain.get(key, execution_id=execution_id)).value for key in keys}

    assert await values() == {"global": "global-value-1", EU: f"{EU}-value-1", US: f"{US}-value-1", "other": "other-value-1"}
    sm.add_version(secret_id, f"{EU}-value-2", location=EU)
    applied = await invalidator.apply(
        pubsub_notice("SECRET_VERSION_ADD", f"projects/{NUMBER}/locations/{EU}/secrets/{secret_id}", "2"))
    assert (applied.changed, applied.refreshed) == (1, 1)
    assert await values() == {"global": "global-value-1", EU: f"{EU}-value-2", US: f"{US}-value-1", "other": "other-value-1"}
    sm.add_version(secret_id, "global-value-2")
    applied = await invalidator.apply(pubsub_notice("SECRET_VERSION_ADD", f"projects/{NUMBER}/secrets/{secret_id}", "2"))
    assert (applied.changed, applied.refreshed) == (1, 1)
    assert await values() == {"global": "global-value-2", EU: f"{EU}-value-2", US: f"{US}-value-1", "other": "other-value-1"}
    # the other project's notice (by its number) reaches its row only
    applied = await invalidator.apply(pubsub_notice("SECRET_DELETE", f"projects/555/secrets/{secret_id}"))
    assert applied.changed == 1  # (and its refresh is refused: the test server serves one project only)
    assert await values(("global", EU, US)) == {"global": "global-value-2", EU: f"{EU}-value-2", US: f"{US}-value-1"}


async def test_secret_ids_in_info_lines_are_the_operators_choice(stack, settings, keychain, key_spec, sm,
                                                                 regional_secrets, caplog):
    secret_id = regional_secrets
    quiet = make_settings(stack, settings.schema_name, key_spec, log_secret_ids=False)
    warmer = Warmer(quiet, keychain)
    invalidator = Invalidator(quiet, keychain, warmer, SecretManagerSource(quiet))
    with caplog.at_level(logging.INFO, logger="streams.invalidate"):
        await invalidator.apply(pubsub_notice("SECRET_DELETE", f"projects/{NUMBER}/locations/{EU}/secrets/{secret_id}"))
        await invalidator.apply(pubsub_notice("SECRET_ROTATE", f"projects/{NUMBER}/secrets/{secret_id}"))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and all("secret#" in line for line in lines)
    assert not [line for line in lines if secret_id in line]

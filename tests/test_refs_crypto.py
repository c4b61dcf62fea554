import base64

import pytest

from keychain.crypto import KeyRing
from keychain.errors import ConfigurationError, DecryptionError, InvalidReference
from keychain.model import Scope
from keychain.refs import SecretRef


@pytest.mark.parametrize(
    "text, secret_name, version, pinned",
    [
        ("projects/1014428265962/secrets/openai-api-key/versions/1", "projects/1014428265962/secrets/openai-api-key", "1", True),
        ("projects/my-proj/secrets/db_pass/versions/latest", "projects/my-proj/secrets/db_pass", "latest", False),
        ("projects/my-proj/secrets/db_pass", "projects/my-proj/secrets/db_pass", "latest", False),
        ("projects/my-proj/secrets/db_pass/versions/prod", "projects/my-proj/secrets/db_pass", "prod", False),
    ],
)
def test_references_parse(text, secret_name, version, pinned):
    ref = SecretRef.parse(text)
    assert (ref.secret_name, ref.version, ref.pinned) == (secret_name, version, pinned)
    assert ref.version_name == f"{secret_name}/versions/{version}"


@pytest.mark.parametrize(
    "text", ["", "openai-api-key", "projects//secrets/x", "projects/p/secrets/x/versions/", "projects/p/secrets/x/versions/0",
             "projects/p/secrets/a b", "projects/p/secrets/x/versions/1/extra", "{{ workload.key }}"],
)
def test_bad_references_are_rejected_clearly(text):
    with pytest.raises(InvalidReference, match="not a Secret Manager reference"):
        SecretRef.parse(text)


def identity(execution_id=1, name="openai"):
    return Scope.of(execution_id=execution_id).identity(name)


def test_seal_and_open_round_trip_with_key_id():
    ring = KeyRing.parse(KeyRing.generate_spec("k1"))
    kid, data = ring.seal(identity(), {"token": "abc"}, 7)
    assert kid == "k1"
    assert b"abc" not in data
    assert ring.open(identity(), kid, data, 7) == {"token": "abc"}


def test_ciphertext_is_bound_to_its_row():
    ring = KeyRing.parse(KeyRing.generate_spec("k1"))
    kid, data = ring.seal(identity(execution_id=1), "value", 7)
    for other in (identity(execution_id=2), identity(name="other"), Scope.of().identity("openai")):
        with pytest.raises(DecryptionError, match="failed authentication"):
            ring.open(other, kid, data, 7)


def test_ciphertext_is_bound_to_its_write():
    """An earlier ciphertext of the same row, written back into `data`, does not match the row's write id."""
    ring = KeyRing.parse(KeyRing.generate_spec("k1"))
    kid, old = ring.seal(identity(), "old value", 1)
    _, new = ring.seal(identity(), "new value", 2)
    assert ring.open(identity(), kid, new, 2) == "new value"
    with pytest.raises(DecryptionError, match="failed authentication"):
        ring.open(identity(), kid, old, 2)


def test_unbound_format_1_opens_only_in_a_row_without_a_write_id():
    """Rows sealed before the write binding keep working until rekeyed; no downgrade into a bound row."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    spec = KeyRing.generate_spec("k1")
    raw = __import__("base64").b64decode(spec.split(":", 1)[1])
    nonce = b"\x00" * 12
    legacy = b"\x01" + nonce + AESGCM(raw).encrypt(nonce, b'"legacy"', identity().associated_data("k1"))
    ring = KeyRing.parse(spec)
    assert ring.open(identity(), "k1", legacy, None) == "legacy"
    with pytest.raises(DecryptionError, match="does not belong"):
        ring.open(identity(), "k1", legacy, 5)


def test_tampering_is_detected_not_decrypted():
    ring = KeyRing.parse(KeyRing.generate_spec("k1"))
    kid, data = ring.seal(identity(), "value", 7)
    flipped = data[:-1] + bytes([data[-1] ^ 1])
    with pytest.raises(DecryptionError):
        ring.open(identity(), kid, flipped, 7)
    with pytest.raises(DecryptionError, match="not a keychain ciphertext"):
        ring.open(identity(), kid, b"\x03" + data[1:], 7)


def test_unknown_key_id_and_relabelled_key_id():
    first, second = KeyRing.generate_spec("k1"), KeyRing.generate_spec("k2")
    ring = KeyRing.parse(f"{second},{first}")
    kid, data = KeyRing.parse(first).seal(identity(), "value", 7)
    assert ring.open(identity(), kid, data, 7) == "value"  # old keys still decrypt
    with pytest.raises(DecryptionError, match="not in KEYCHAIN_KEYS"):
        KeyRing.parse(second).open(identity(), kid, data, 7)
    # Same key bytes under another id: the key id is part of the associated data.
    same_bytes = KeyRing.parse(f"k9:{first.split(':', 1)[1]}")
    with pytest.raises(DecryptionError):
        same_bytes.open(identity(), "k9", data, 7)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("", "empty"),
        ("k1", "kid:base64"),
        ("k1:not-base64!!", "not valid base64"),
        (f"k1:{base64.b64encode(b'short').decode()}", "must be 32 bytes"),
        (f"k1:{base64.b64encode(bytes(32)).decode()},k1:{base64.b64encode(bytes(32)).decode()}", "appears twice"),
        (f"bad id:{base64.b64encode(bytes(32)).decode()}", "bad key id"),
    ],
)
def test_bad_key_rings_are_configuration_errors(spec, message):
    with pytest.raises(ConfigurationError, match=message):
        KeyRing.parse(spec)


def test_scope_rules():
    assert Scope.of(execution_id=5).scope_id == "5"
    assert Scope.of(session_id="abc").type == "session"
    assert Scope.of().type == "global"
    with pytest.raises(ValueError):
        Scope.of(scope="execution")
    with pytest.raises(ValueError):
        Scope.of(execution_id=1, session_id="x")
    with pytest.raises(ValueError):
        Scope.of(execution_id=1, scope="global")

"""Encryption at rest: AES-256-GCM under a key ring.

Every row is sealed with the active key and carries that key's id. The associated data binds the ciphertext to the
row's identity (credential, scope, execution/session), its key id and its write (a random write id stored beside it,
format 2), so a ciphertext copied into any other row, relabelled with another key id, or an earlier ciphertext of the
same row written back, fails authentication instead of yielding a wrong value. Format 1 (no write id: rows sealed
before the write binding) still opens, only in a row without a write id, until `rekey` seals it again.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import ConfigurationError, DecryptionError
from .model import RowIdentity, compact_json

FORMAT_UNBOUND = b"\x01"  # associated data: identity and key id
FORMAT_VERSION = b"\x02"  # associated data: identity, key id and the row's write id
NONCE_BYTES = 12
_KID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def new_write_id() -> int:
    """A random positive 63-bit id for one write (a BIGINT column)."""
    return int.from_bytes(os.urandom(8), "big") >> 1


class KeyRing:
    """Keys by id; the first one is active. Built from `KEYCHAIN_KEYS` (`kid:base64,kid:base64`)."""

    def __init__(self, keys: list[tuple[str, bytes]]):
        if not keys:
            raise ConfigurationError("KEYCHAIN_KEYS is empty: give at least one `kid:base64-of-32-bytes` key")
        self._keys: dict[str, AESGCM] = {}
        for kid, raw in keys:
            if not _KID.match(kid):
                raise ConfigurationError(f"KEYCHAIN_KEYS: bad key id {kid[:64]!r} (letters, digits, _ . -)")
            if len(raw) != 32:
                raise ConfigurationError(f"KEYCHAIN_KEYS: key {kid!r} must be 32 bytes, got {len(raw)}")
            if kid in self._keys:
                raise ConfigurationError(f"KEYCHAIN_KEYS: key id {kid!r} appears twice")
            self._keys[kid] = AESGCM(raw)
        self.active_key_id = keys[0][0]

    @classmethod
    def parse(cls, spec: str) -> "KeyRing":
        keys = []
        for item in filter(None, (part.strip() for part in spec.split(","))):
            kid, sep, encoded = item.partition(":")
            if not sep:
                raise ConfigurationError("KEYCHAIN_KEYS: each key must be written `kid:base64-of-32-bytes`")
            try:
                raw = base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError):
                raise ConfigurationError(f"KEYCHAIN_KEYS: key {kid!r} is not valid base64") from None
            keys.append((kid, raw))
        return cls(keys)

    @staticmethod
    def generate_spec(kid: str = "k1") -> str:
        return f"{kid}:{base64.b64encode(os.urandom(32)).decode()}"

    @property
    def key_ids(self) -> list[str]:
        return list(self._keys)

    def seal(self, identity: RowIdentity, value: Any, write_id: int) -> tuple[str, bytes]:
        """Encrypt a JSON value for one write of one row; returns (key id, ciphertext)."""
        kid = self.active_key_id
        nonce = os.urandom(NONCE_BYTES)
        plaintext = compact_json(value).encode()
        sealed = self._keys[kid].encrypt(nonce, plaintext, identity.associated_data(kid, write_id))
        return kid, FORMAT_VERSION + nonce + sealed

    def open(self, identity: RowIdentity, key_id: str, data: bytes, write_id: int | None) -> Any:
        aead = self._keys.get(key_id)
        if aead is None:
            raise DecryptionError(
                f"{identity.credential_name}: encrypted under key {key_id!r}, which is not in KEYCHAIN_KEYS"
            )
        if len(data) < 1 + NONCE_BYTES + 16 or data[:1] not in (FORMAT_VERSION, FORMAT_UNBOUND):
            raise DecryptionError(f"{identity.credential_name}: stored data is not a keychain ciphertext")
        if (data[:1] == FORMAT_VERSION) != (write_id is not None):  # no downgrade to format 1 in a bound row
            raise DecryptionError(f"{identity.credential_name}: ciphertext does not belong to this row's write")
        nonce, sealed = data[1 : 1 + NONCE_BYTES], data[1 + NONCE_BYTES :]
        try:
            plaintext = aead.decrypt(nonce, sealed, identity.associated_data(key_id, write_id))
        except InvalidTag:
            raise DecryptionError(
                f"{identity.credential_name}: ciphertext failed authentication "
                "(tampered, copied from another row or an earlier write, or wrong key)"
            ) from None
        return json.loads(plaintext)

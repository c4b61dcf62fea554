"""NoETL's envelope (its `src/crypto/envelope.rs`, `encryption.rs`): the text NoETL's server stores in
`noetl.keychain.data_encrypted` and opens on every hit.

A fresh 32-byte data key per row; AES-256-GCM of the value's compact JSON, no associated data, stored as base64 of
`nonce(12) || ciphertext || tag(16)`; the data key wrapped by NoETL's key-encryption key (kek.py); all of it as
`{"v":1,"alg":"AES-256-GCM","ct":...,"dek":{"p":...,"kid":...,"kv":...,"ct":...}}`, fields in that order.
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .kek import NONCE_BYTES, WrappedKey

VERSION = 1
ALGORITHM = "AES-256-GCM"

# serde_json's compact form: no spaces, non-ASCII as UTF-8 (either reads the same; this is byte for byte NoETL's)
_compact = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def seal(value: Any, data_key: WrappedKey) -> str:
    """The storage string of `value` under one fresh data key (never use a data key twice)."""
    nonce = os.urandom(NONCE_BYTES)
    ciphertext = AESGCM(data_key.key).encrypt(nonce, _compact(value).encode(), None)
    return _compact({
        "v": VERSION,
        "alg": ALGORITHM,
        "ct": base64.b64encode(nonce + ciphertext).decode(),
        "dek": {"p": data_key.provider, "kid": data_key.key_id, "kv": data_key.key_version,
                "ct": base64.b64encode(data_key.ciphertext).decode()},
    })

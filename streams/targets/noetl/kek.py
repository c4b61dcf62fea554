"""NoETL's key-encryption key (its `src/crypto/keymanager.rs`, `kms_gcp.rs`, `mod.rs`), chosen by NoETL's own
variables, so the warmer wraps data keys exactly as NoETL's server unwraps them:

- `NOETL_KMS_PROVIDER=local` (NoETL's default; also empty): the KEK is `NOETL_ENCRYPTION_KEY`, base64 of 32 bytes; a
  wrapped data key is `nonce(12) || AES-256-GCM(KEK, data key)` (no associated data), labelled provider `local`, key id
  `env:NOETL_ENCRYPTION_KEY`, version `v1`.
- `NOETL_KMS_PROVIDER=gcp-kms` (or `gcp`): Cloud KMS Encrypt on the CryptoKey `NOETL_GCP_KMS_KEY`, through the
  official client; provider `gcp-kms`, key id the CryptoKey, version the number after `cryptoKeyVersions/` in the
  answer's name (`primary` when there is none). `KMS_ENDPOINT` points the client at a local plain gRPC server (the
  Cloud KMS test server), as SECRET_MANAGER_ENDPOINT does for Secret Manager.

Cloud KMS is kept off the warm's path: `DataKeys` keeps a small pool of data keys wrapped ahead (each used for one
row only, as NoETL does: a fresh data key per row) and refills it in the background; a burst larger than the pool
waits for Encrypt calls made several at a time.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import os
from dataclasses import dataclass, field
from typing import Protocol

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keychain.errors import ConfigurationError

log = logging.getLogger(__name__)

DATA_KEY_BYTES = 32
NONCE_BYTES = 12


@dataclass(frozen=True)
class WrappedKey:
    """A data key and its wrapping, as the envelope's `dek` object records it."""

    key: bytes = field(repr=False)
    provider: str  # p
    key_id: str  # kid
    key_version: str  # kv
    ciphertext: bytes  # ct


class Kek(Protocol):
    provider: str

    async def wrap(self, data_key: bytes) -> WrappedKey: ...

    async def close(self) -> None: ...


class LocalKek:
    """NoETL's LocalDevKms."""

    provider = "local"
    key_id = "env:NOETL_ENCRYPTION_KEY"
    key_version = "v1"

    def __init__(self, key_base64: str):
        try:
            raw = base64.b64decode(key_base64.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise ConfigurationError("NOETL_ENCRYPTION_KEY is not valid base64") from None
        if len(raw) != DATA_KEY_BYTES:
            raise ConfigurationError(f"NOETL_ENCRYPTION_KEY must be base64 of 32 bytes, got {len(raw)} bytes")
        self._aead = AESGCM(raw)

    async def wrap(self, data_key: bytes) -> WrappedKey:
        nonce = os.urandom(NONCE_BYTES)
        return WrappedKey(data_key, self.provider, self.key_id, self.key_version,
                          nonce + self._aead.encrypt(nonce, data_key, None))

    async def close(self) -> None:
        return None


class CloudKmsKek:
    """NoETL's GcpKms, through the official async client (google-cloud-kms)."""

    provider = "gcp-kms"

    def __init__(self, key_name: str, endpoint: str | None = None, timeout_seconds: float = 10.0):
        if "/cryptoKeys/" not in key_name:
            raise ConfigurationError("NOETL_GCP_KMS_KEY must be a Cloud KMS CryptoKey "
                                     "(projects/P/locations/L/keyRings/R/cryptoKeys/K)")
        self.key_id = key_name
        self._endpoint = endpoint
        self._timeout = timeout_seconds
        self._client = None

    def _connect(self):
        if self._client is None:
            from google.cloud import kms_v1

            if self._endpoint:  # a local plain gRPC server (the test server): no TLS, no credentials
                import grpc
                from google.cloud.kms_v1.services.key_management_service.transports import (
                    KeyManagementServiceGrpcAsyncIOTransport,
                )

                transport = KeyManagementServiceGrpcAsyncIOTransport(channel=grpc.aio.insecure_channel(self._endpoint))
                self._client = kms_v1.KeyManagementServiceAsyncClient(transport=transport)
            else:
                self._client = kms_v1.KeyManagementServiceAsyncClient()
        return self._client

    async def wrap(self, data_key: bytes) -> WrappedKey:
        import google_crc32c

        answer = await self._connect().encrypt(
            request={"name": self.key_id, "plaintext": data_key, "plaintext_crc32c": google_crc32c.value(data_key)},
            timeout=self._timeout)
        if not answer.verified_plaintext_crc32c or answer.ciphertext_crc32c != google_crc32c.value(answer.ciphertext):
            raise ConfigurationError("Cloud KMS Encrypt: the answer failed its CRC32C check")
        _, found, version = answer.name.rpartition("cryptoKeyVersions/")
        return WrappedKey(data_key, self.provider, self.key_id, version if found and version else "primary",
                          bytes(answer.ciphertext))

    async def close(self) -> None:
        if self._client is not None:
            await self._client.transport.close()
            self._client = None


def kek_from(provider: str | None, encryption_key: str | None, gcp_kms_key: str | None,
             kms_endpoint: str | None) -> Kek:
    """NoETL's `build_key_manager`: its provider names (trimmed, any case), and a clear refusal without the key the
    chosen provider needs."""
    chosen = (provider or "local").strip().lower()
    if chosen in ("", "local"):
        if not encryption_key or not encryption_key.strip():
            raise ConfigurationError("NOETL_KMS_PROVIDER=local needs NOETL_ENCRYPTION_KEY (NoETL's base64 32-byte "
                                     "key) to write rows NoETL's server can open")
        return LocalKek(encryption_key)
    if chosen in ("gcp-kms", "gcp"):
        if not gcp_kms_key:
            raise ConfigurationError("NOETL_KMS_PROVIDER=gcp-kms needs NOETL_GCP_KMS_KEY (a Cloud KMS CryptoKey: "
                                     "projects/P/locations/L/keyRings/R/cryptoKeys/K)")
        return CloudKmsKek(gcp_kms_key, kms_endpoint)
    raise ConfigurationError(f"NOETL_KMS_PROVIDER must be local or gcp-kms, as NoETL's server reads it "
                             f"(got {chosen[:40]!r})")


class DataKeys:
    """Fresh data keys, each wrapped by the KEK and handed out once. With Cloud KMS, `ahead` of them are wrapped in
    the background before they are needed, `concurrency` Encrypt calls at a time; a local KEK wraps in microseconds,
    so nothing is kept ahead for it."""

    def __init__(self, kek: Kek, *, ahead: int, concurrency: int = 8):
        self.kek = kek
        self._ahead = ahead if kek.provider != "local" else 0
        self._ready: asyncio.Queue[WrappedKey] = asyncio.Queue()
        self._concurrency = asyncio.Semaphore(concurrency)
        self._filling: set[asyncio.Task[None]] = set()

    async def take(self) -> WrappedKey:
        if not self._ahead:
            return await self.kek.wrap(os.urandom(DATA_KEY_BYTES))
        self._refill()
        if self._ready.empty():  # a burst beyond the pool: wrap this one now (several calls in flight meanwhile)
            async with self._concurrency:
                return await self.kek.wrap(os.urandom(DATA_KEY_BYTES))
        return self._ready.get_nowait()

    async def take_many(self, count: int) -> list[WrappedKey]:
        return list(await asyncio.gather(*(self.take() for _ in range(count))))

    def start(self) -> None:
        """Fill the pool now (the worker's start), so the first burst does not wait for Cloud KMS."""
        self._refill()

    def _refill(self) -> None:
        missing = self._ahead - self._ready.qsize() - len(self._filling)
        for _ in range(max(0, missing)):
            task = asyncio.ensure_future(self._wrap_one())
            self._filling.add(task)
            task.add_done_callback(self._filling.discard)

    async def _wrap_one(self) -> None:
        try:
            async with self._concurrency:
                self._ready.put_nowait(await self.kek.wrap(os.urandom(DATA_KEY_BYTES)))
        except Exception as exc:  # the next take wraps its own, and refills again
            log.warning("a data key could not be wrapped ahead (%s)", type(exc).__name__)

    async def close(self) -> None:
        for task in list(self._filling):
            task.cancel()
        await asyncio.gather(*self._filling, return_exceptions=True)
        await self.kek.close()

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
waits for Encrypt calls made several at a time; a failing KMS is left alone for a backoff.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import os
import random
import time
from collections import deque
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
            retry=None, timeout=self._timeout)  # one attempt: DataKeys owns the retries (its backoff)
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


def kek_for(settings) -> Kek:
    """NoETL's key-encryption key from the worker's settings (NoETL's own variables; the local key inline or from
    NOETL_ENCRYPTION_KEY_FILE, its trailing newline stripped)."""
    key = settings.noetl_encryption_key.get_secret_value() if settings.noetl_encryption_key else None
    if not key and settings.noetl_encryption_key_file:
        try:
            with open(settings.noetl_encryption_key_file, encoding="utf-8") as file:
                key = file.read().rstrip("\r\n")
        except OSError as exc:
            raise ConfigurationError(f"NOETL_ENCRYPTION_KEY_FILE cannot be read ({exc.strerror})") from None
    return kek_from(settings.noetl_kms_provider, key, settings.noetl_gcp_kms_key, settings.kms_endpoint)


class KekUnavailable(Exception):
    """No data key could be wrapped: the key-encryption key (Cloud KMS) failed, and is not asked again until its
    backoff ends."""


class DataKeys:
    """Fresh data keys, each wrapped by the KEK and handed out once. With Cloud KMS, `ahead` of them are wrapped in
    the background before they are needed, by ONE refiller, `concurrency` Encrypt calls at a time; a local KEK wraps
    in microseconds, so nothing is kept ahead for it. When Encrypt fails, nobody calls it again until a backoff
    (doubling, jittered, up to MAX_BACKOFF_SECONDS) has passed: neither the refiller nor a take, which fails at once
    meanwhile (the warm tries its rows again later)."""

    MAX_BACKOFF_SECONDS = 30.0
    FIRST_BACKOFF_SECONDS = 0.25

    def __init__(self, kek: Kek, *, ahead: int = 256, concurrency: int = 8):
        self.kek = kek
        self._ahead = ahead if kek.provider != "local" else 0
        self._ready: deque[WrappedKey] = deque()
        self._concurrency = asyncio.Semaphore(concurrency)
        self._batch = concurrency
        self._wanted = asyncio.Event()
        self._refiller: asyncio.Task[None] | None = None
        self._failures = 0  # in a row
        self._retry_at = 0.0  # time.monotonic(): no Encrypt call before it
        self.wrap_calls = 0

    @property
    def backoff_remaining(self) -> float:
        """Seconds before the KEK is asked again after a failure (0: it may be asked now)."""
        return max(0.0, self._retry_at - time.monotonic())

    async def take_many(self, count: int) -> list[WrappedKey]:
        """`count` data keys: from those wrapped ahead, the rest wrapped now. KekUnavailable while the KEK is in its
        backoff, or when a wrap fails now (the keys taken are put back)."""
        taken = [self._ready.popleft() for _ in range(min(count, len(self._ready)))]
        self._wanted.set()
        missing = count - len(taken)
        if not missing:
            return taken
        try:
            if time.monotonic() < self._retry_at:
                raise KekUnavailable("the key-encryption key failed a moment ago; not asked again yet")
            wrapped = await asyncio.gather(*(self._wrap() for _ in range(missing)))
        except Exception as exc:
            self._ready.extendleft(reversed(taken))
            if not isinstance(exc, KekUnavailable):
                self._failed(exc)
            raise KekUnavailable(type(exc).__name__) from None
        self._failures = 0
        return taken + list(wrapped)

    def start(self) -> None:
        """Start the refiller (the worker's start), so the first burst does not wait for Cloud KMS."""
        if self._ahead and self._refiller is None:
            self._wanted.set()
            self._refiller = asyncio.ensure_future(self._refill())

    async def _refill(self) -> None:
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            while len(self._ready) < self._ahead:
                pause = self._retry_at - time.monotonic()
                if pause > 0:
                    await asyncio.sleep(pause)
                count = min(self._batch, self._ahead - len(self._ready))
                results = await asyncio.gather(*(self._wrap() for _ in range(count)), return_exceptions=True)
                self._ready.extend(r for r in results if isinstance(r, WrappedKey))
                errors = [r for r in results if isinstance(r, BaseException)]
                if errors:
                    self._failed(errors[0])
                else:
                    self._failures = 0

    async def _wrap(self) -> WrappedKey:
        async with self._concurrency:
            self.wrap_calls += 1
            return await self.kek.wrap(os.urandom(DATA_KEY_BYTES))

    def _failed(self, exc: BaseException) -> None:
        self._failures += 1
        backoff = min(self.MAX_BACKOFF_SECONDS, self.FIRST_BACKOFF_SECONDS * 2 ** (self._failures - 1))
        backoff = random.uniform(backoff / 2, backoff)
        self._retry_at = time.monotonic() + backoff
        log.warning("the key-encryption key failed (%s, %d in a row): no data key is wrapped for %.1fs",
                    type(exc).__name__, self._failures, backoff)

    async def close(self) -> None:
        if self._refiller is not None:
            self._refiller.cancel()
            await asyncio.gather(self._refiller, return_exceptions=True)
            self._refiller = None
        self._ready.clear()
        await self.kek.close()

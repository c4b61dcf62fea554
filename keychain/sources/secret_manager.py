"""Google Secret Manager through the official async client.

The client does not verify the payload checksum: this module checks CRC32C itself, and turns every refusal into a
typed error that never carries the payload. It makes ONE attempt per access, with the client's own retries off: the
retries of UNAVAILABLE / DEADLINE_EXCEEDED belong to the fetcher (keychain/fetcher.py), which knows its caller's
deadline and lets go of the cross-process lock between attempts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import google_crc32c
import grpc
from google.api_core import exceptions as gexc
from google.cloud.secretmanager_v1 import SecretManagerServiceAsyncClient
from google.cloud.secretmanager_v1.services.secret_manager_service.transports import (
    SecretManagerServiceGrpcAsyncIOTransport,
)

from .. import metrics
from ..errors import (
    ChecksumMismatch,
    SecretNotFound,
    SecretPermissionDenied,
    SecretSourceError,
    SecretUnavailable,
    SecretVersionDisabled,
)
from ..refs import SecretRef
from ..settings import Settings

log = logging.getLogger(__name__)

_TRANSIENT = (gexc.ServiceUnavailable, gexc.DeadlineExceeded)
_PERMANENT: dict[type[Exception], type[SecretSourceError]] = {
    gexc.NotFound: SecretNotFound,
    gexc.PermissionDenied: SecretPermissionDenied,
    gexc.FailedPrecondition: SecretVersionDisabled,
}


@dataclass(frozen=True)
class SecretValue:
    """One accessed version. `version_name` is the service's own name: the project by number, the version resolved."""

    version_name: str
    payload: bytes = field(repr=False)

    @property
    def ref(self) -> SecretRef:
        return SecretRef.parse(self.version_name)

    @property
    def text(self) -> str:
        return self.payload.decode("utf-8")


def build_client(settings: Settings, location: str | None = None) -> SecretManagerServiceAsyncClient:
    """The real service with application default credentials (a regional secret's at its location's endpoint), or a
    local plain-text gRPC endpoint, which serves every location at its one address."""
    if settings.secret_manager_endpoint:
        channel = grpc.aio.insecure_channel(settings.secret_manager_endpoint)
        return SecretManagerServiceAsyncClient(transport=SecretManagerServiceGrpcAsyncIOTransport(channel=channel))
    if location:
        return SecretManagerServiceAsyncClient(client_options={"api_endpoint": regional_endpoint(location)})
    return SecretManagerServiceAsyncClient()


def regional_endpoint(location: str) -> str:
    """Where Google serves a regional secret."""
    return f"secretmanager.{location}.rep.googleapis.com"


class SecretManagerSource:
    def __init__(self, settings: Settings, client: SecretManagerServiceAsyncClient | None = None):
        """`client`: the global endpoint's client (default: built on first use)."""
        self._settings = settings
        self._clients: dict[str | None, SecretManagerServiceAsyncClient] = {None: client} if client else {}
        self.calls = 0  # accesses sent to Secret Manager by this source

    @property
    def client(self) -> SecretManagerServiceAsyncClient:
        """The global endpoint's client."""
        return self.client_for(None)

    def client_for(self, location: str | None) -> SecretManagerServiceAsyncClient:
        """One client per location (None: global), built on first use so its gRPC channel binds to the running
        event loop."""
        client = self._clients.get(location)
        if client is None:
            client = self._clients[location] = build_client(self._settings, location)
        return client

    async def connect(self, timeout: float = 5.0) -> bool:
        """Open the gRPC channel now instead of on the first call. False when it did not open in time (the first
        call then tries again, with its own deadline and retries)."""
        try:
            await asyncio.wait_for(self.client.transport.grpc_channel.channel_ready(), timeout)
        except (TimeoutError, grpc.RpcError):
            return False
        return True

    async def access(self, ref: SecretRef, *, timeout: float | None = None) -> SecretValue:
        """One attempt, within `timeout` (default SECRET_MANAGER_TIMEOUT_SECONDS). UNAVAILABLE and
        DEADLINE_EXCEEDED raise SecretUnavailable (transient: the fetcher retries it)."""
        try:
            self.calls += 1
            response = await self._access_once(ref, timeout or self._settings.secret_manager_timeout_seconds)
        except _TRANSIENT as exc:
            raise SecretUnavailable(str(ref), type(exc).__name__) from None
        except tuple(_PERMANENT) as exc:
            raise _PERMANENT[_permanent_type(exc)](str(ref)) from None
        except gexc.GoogleAPICallError as exc:
            raise SecretSourceError(str(ref), type(exc).__name__) from None

        payload = response.payload
        if payload.data_crc32c is not None and "data_crc32c" in payload:
            if google_crc32c.value(payload.data) != payload.data_crc32c:
                raise ChecksumMismatch(str(ref), "payload CRC32C does not match")
        return SecretValue(version_name=response.name or ref.version_name, payload=payload.data)

    async def _access_once(self, ref: SecretRef, timeout: float):
        started = time.perf_counter()
        try:
            response = await self.client_for(ref.location).access_secret_version(name=ref.version_name, retry=None,
                                                                                  timeout=timeout)
        except gexc.GoogleAPICallError as exc:
            metrics.SECRET_MANAGER_CALLS.labels(exc.grpc_status_code.name if exc.grpc_status_code else "ERROR").inc()
            raise
        finally:
            metrics.SECRET_MANAGER_SECONDS.observe(time.perf_counter() - started)
        metrics.SECRET_MANAGER_CALLS.labels("OK").inc()
        return response

    async def latest_version(self, ref: SecretRef) -> str:
        """The version number `latest` resolves to now (GetSecretVersion: the read quota, not the access quota)."""
        try:
            version = await self.client_for(ref.location).get_secret_version(
                name=ref.with_version("latest").version_name, retry=None,
                timeout=self._settings.secret_manager_timeout_seconds,
            )
        except tuple(_PERMANENT) as exc:
            raise _PERMANENT[_permanent_type(exc)](str(ref)) from None
        except gexc.GoogleAPICallError as exc:
            raise SecretUnavailable(str(ref), type(exc).__name__) from None
        return SecretRef.parse(version.name).version

    async def close(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.transport.close()


def _permanent_type(exc: Exception) -> type[Exception]:
    return next(kind for kind in _PERMANENT if isinstance(exc, kind))

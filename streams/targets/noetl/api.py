"""NoETL's own keychain API (noetl/server `src/handlers/keychain.rs`, `src/services/keychain.rs`), the way the noetl
target writes and invalidates NoETL's rows when KEYCHAIN_NOETL_API_URL is set: NoETL's server seals each value with
its own key, so the warmer holds none.

- `POST /api/keychain/{catalog_id}/{keychain_name}`, body `{"data": VALUE, "scope_type": "local", "execution_id": E,
  "expires_in": SECONDS, "auto_renew": false}`: the server builds the cache key `{name}:{catalog_id}:{E}`, seals
  `data` in its envelope and upserts the row (its columns: no `parent_execution_id`).
- `DELETE /api/keychain/{catalog_id}/{keychain_name}?execution_id=E&scope_type=local`: deletes that row (its answer
  says `deleted` or `not_found`; both leave no row).
A gateway in front of the server may ask for a bearer token (KEYCHAIN_NOETL_API_TOKEN). Any other answer than 2xx,
or no answer within the timeout, is an error (NoetlApiError, naming the status, never the body): the warm tries the
rows again; an invalidation is applied from the outbox, apart from our own rows (streams/deferred.py).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import quote

import aiohttp

from ..base import TargetError

log = logging.getLogger(__name__)

TIMEOUT_SECONDS = 10.0
CONCURRENCY = 16  # requests in flight to NoETL's server


class NoetlApiError(TargetError):
    """NoETL's keychain API did not do what was asked: `status` is its HTTP answer (None: no answer). Never an outage
    of ours: a write is tried again until the warm's deadline, an invalidation from the outbox (streams/deferred.py).
    A 4xx other than 404, 409 and 429 is a refusal for good."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status
        if status in (401, 403):
            self.reason, self.permanent = "unauthorized", True
        elif status is not None and 400 <= status < 500 and status not in (404, 409, 429):
            self.reason, self.permanent = "rejected", True


class NoetlApi:
    def __init__(self, base_url: str, token: str | None = None):
        self._base = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._session: aiohttp.ClientSession | None = None
        self._slots = asyncio.Semaphore(CONCURRENCY)

    def _url(self, catalog_id: int, keychain_name: str) -> str:
        return f"{self._base}/api/keychain/{catalog_id}/{quote(keychain_name, safe='')}"

    async def put(self, catalog_id: int, keychain_name: str, execution_id: int, value: Any,
                  ttl_seconds: float) -> None:
        """Seal and upsert one execution's row (scope `local`, as the server's own cache writes it)."""
        body = {"data": value, "scope_type": "local", "execution_id": execution_id,
                "expires_in": int(ttl_seconds), "auto_renew": False}
        await self._call("POST", self._url(catalog_id, keychain_name), json=body)

    async def delete(self, catalog_id: int, keychain_name: str, execution_id: int | None, scope_type: str) -> None:
        """Delete one row (a row already gone is fine)."""
        params = {"scope_type": scope_type, **({"execution_id": str(execution_id)} if execution_id is not None else {})}
        await self._call("DELETE", self._url(catalog_id, keychain_name), params=params)

    async def _call(self, method: str, url: str, **kwargs: Any) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(headers=self._headers,
                                                  timeout=aiohttp.ClientTimeout(total=TIMEOUT_SECONDS))
        async with self._slots:
            try:
                async with self._session.request(method, url, **kwargs) as response:
                    gone = method == "DELETE" and response.status == 404  # a gateway's answer for a row gone: done
                    if response.status // 100 != 2 and not gone:
                        raise NoetlApiError(f"{method} /api/keychain: HTTP {response.status}", response.status)
                    await response.read()
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                raise NoetlApiError(f"{method} /api/keychain: {type(exc).__name__}") from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

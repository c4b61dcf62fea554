"""A synchronous facade for workers that are not async: the same Keychain, on an event loop in a thread of its own."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from .model import Lookup
from .settings import Settings
from .sources import SecretManagerSource
from .store import Keychain


class SyncKeychain:
    """`with SyncKeychain(settings) as kc: kc.get("name", execution_id=1)`; safe to share between threads."""

    def __init__(self, settings: Settings, *, read_through: bool = True):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="keychain-sync", daemon=True)
        self._thread.start()
        source = SecretManagerSource(settings) if read_through else None
        self._keychain = Keychain(settings, source=source)
        self._call(self._keychain.open())

    def _call(self, coroutine) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def get(self, name: str, **scope: Any) -> Lookup:
        return self._call(self._keychain.get(name, **scope))

    def get_or_fetch(self, name: str, ref: str, **scope: Any) -> Lookup:
        return self._call(self._keychain.get_or_fetch(name, ref, **scope))

    def put(self, name: str, value: Any, **options: Any) -> None:
        self._call(self._keychain.put(name, value, **options))

    def close(self) -> None:
        self._call(self._keychain.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> "SyncKeychain":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

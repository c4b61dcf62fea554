"""NoETL's keychain API, re-stated small for the tests (NoETL's server is Rust and cannot be built here): the part of
its server the noetl target's API mode (KEYCHAIN_NOETL_API_URL) calls. Written from noetl/server v3.83 as facts:

`POST /api/keychain/{catalog_id}/{keychain_name}` (`src/handlers/keychain.rs` set, `src/services/keychain.rs` set,
`src/db/models/keychain.rs` KeychainSetRequest): the body's `data` (any JSON), `scope_type` (default `global`),
`execution_id`, `expires_at` or else `expires_in` seconds from now, `auto_renew` (default false), `renew_config`. The
cache key is `build_cache_key` (`src/db/queries/keychain.rs`): `local` -> `{name}:{catalog}:{execution}` (or
`{name}:{catalog}:local`), `shared` -> `{name}:{catalog}:shared:{execution}` (or `...:shared`), anything else ->
`{name}:{catalog}:global`. `data` is sealed with the server's own key in its envelope and upserted:
`INSERT (cache_key, catalog_id, keychain_name, credential_type, cache_type, scope_type, execution_id, data_encrypted,
expires_at, auto_renew, renew_config) VALUES (..., 'secret', 'secret', ...) ON CONFLICT (cache_key) DO UPDATE SET
data_encrypted, expires_at, auto_renew, renew_config`. Answer `{"status": "success", "cache_key", "expires_at"}`.

`DELETE /api/keychain/{catalog_id}/{keychain_name}?execution_id=E&scope_type=S` (scope default `global`): deletes the
row of that cache key; answers `{"status": "deleted" | "not_found", "cache_key"}`.

A path id that is not an i64, or a body that is not the request's shape, is a 4xx (axum's extractors). What is not
NoETL's, and says so: `token` stands for the gateway in front of the server (a bearer token, else 401), and `fail`
makes the next answers a `fail_status` (503 by default: the server or its gateway down; 401: the gateway's token
expired), for the tests.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any, Callable

import asyncpg
from aiohttp import web

from .noetl_server import build_cache_key, rust_i64


def _i64(text: str | None) -> int | None:
    """A path or query id as axum extracts it: an i64, else a 400."""
    if text is None:
        return None
    value = rust_i64(text)
    if value is None:
        raise web.HTTPBadRequest(text="not an i64")
    return value


class NoetlKeychainApi:
    """NoETL's keychain API over a pool on NoETL's database (schema `schema`), sealing with `seal` (the server's
    envelope under its own key: devtools/noetl_server.py's `NoetlServerReads.seal`)."""

    def __init__(self, pool: asyncpg.Pool, schema: str, seal: Callable[[Any], str], *, token: str | None = None):
        self.pool, self.schema, self.seal, self.token = pool, schema, seal, token
        self.calls: Counter[str] = Counter()  # answered requests by method
        self.fail = 0  # the next `fail` requests answer `fail_status`
        self.fail_status = 503
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> "NoetlKeychainApi":
        app = web.Application(middlewares=[self._gateway])
        path = "/api/keychain/{catalog_id}/{keychain_name}"
        app.router.add_post(path, self._set)
        app.router.add_delete(path, self._delete)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @web.middleware
    async def _gateway(self, request: web.Request, handler):
        if self.token and request.headers.get("Authorization") != f"Bearer {self.token}":
            raise web.HTTPUnauthorized()
        if self.fail > 0:
            self.fail -= 1
            return web.Response(status=self.fail_status)
        response = await handler(request)
        self.calls[request.method] += 1
        return response

    async def _set(self, request: web.Request) -> web.Response:
        catalog_id, name = _i64(request.match_info["catalog_id"]), request.match_info["keychain_name"]
        try:
            body = await request.json()
        except json.JSONDecodeError:
            raise web.HTTPBadRequest(text="not JSON") from None
        if not isinstance(body, dict) or "data" not in body:
            raise web.HTTPUnprocessableEntity(text="missing field `data`")
        scope_type = body.get("scope_type", "global")
        execution_id = body.get("execution_id")
        cache_key = build_cache_key(name, catalog_id, scope_type, execution_id)
        async with self.pool.acquire() as conn:
            expires_at = await conn.fetchval(
                "SELECT coalesce($1::timestamptz, now() + make_interval(secs => $2::bigint))",
                body.get("expires_at"), body.get("expires_in"))
            await conn.execute(
                f"INSERT INTO {self.schema}.keychain (cache_key, catalog_id, keychain_name, credential_type, "
                "cache_type, scope_type, execution_id, data_encrypted, expires_at, auto_renew, renew_config) "
                "VALUES ($1, $2, $3, 'secret', 'secret', $4, $5, $6, $7, $8, $9) ON CONFLICT (cache_key) DO UPDATE "
                "SET data_encrypted = EXCLUDED.data_encrypted, expires_at = EXCLUDED.expires_at, "
                "auto_renew = EXCLUDED.auto_renew, renew_config = EXCLUDED.renew_config",
                cache_key, catalog_id, name, scope_type, execution_id, self.seal(body["data"]), expires_at,
                bool(body.get("auto_renew", False)),
                json.dumps(body["renew_config"]) if body.get("renew_config") is not None else None)
        return web.json_response({"status": "success", "cache_key": cache_key,
                                  "expires_at": expires_at.isoformat() if expires_at else None})

    async def _delete(self, request: web.Request) -> web.Response:
        catalog_id, name = _i64(request.match_info["catalog_id"]), request.match_info["keychain_name"]
        cache_key = build_cache_key(name, catalog_id, request.query.get("scope_type", "global"),
                                    _i64(request.query.get("execution_id")))
        deleted = await self.pool.fetchval(
            f"WITH d AS (DELETE FROM {self.schema}.keychain WHERE cache_key = $1 RETURNING 1) SELECT count(*) FROM d",
            cache_key)
        return web.json_response({"status": "deleted" if deleted else "not_found",
                                  "cache_key": cache_key if deleted else None})

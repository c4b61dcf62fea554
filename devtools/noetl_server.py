"""What NoETL's server does when a step asks it for a credential, re-stated small for the demo and the tests (NoETL's
server is Rust and cannot be built here). Written from noetl/server v3.83 as facts, not translated line by line:

`GET /api/credentials/{alias}?include_data=true&execution_id=E` (`src/services/credential.rs`):
1. `noetl.credential` first: by id when the alias parses as an i64 (Rust's `parse::<i64>`: a sign, ASCII digits),
   else by name. A credential found wins.
2. The execution's start record: `SELECT catalog_id, context->'workload' FROM noetl.event WHERE execution_id = E AND
   event_type IN ('playbook.initialized', 'playbook_started') LIMIT 1`; none: not found.
3. The keychain (`src/services/keychain.rs`, `src/db/queries/keychain.rs`): the row of cache key
   `{alias}:{catalog_id}:{E}`; `expires_at < now` is a miss; a hit bumps `access_count`, sets `accessed_at` and opens
   the envelope (`src/crypto/envelope.rs`); a row it cannot open is a miss ("a cache error degrades to a fresh
   resolution").
4. A miss: the catalog row's YAML `content`, the playbook's first `keychain:` entry named `alias`; `provider: gcp`
   passes the residency gate first (`src/secrets/residency.rs`: the entry's `region`, else NOETL_SERVER_REGION, against
   NOETL_SERVER_REGION; `strict` refuses a mismatch unless `allowed_regions` names the server's region), then
   fetches from Secret Manager (`src/secrets/resolver.rs`, `gcp.rs`): with `map`, each field's template rendered
   against the workload (undefined names render empty), the value `{field: text}`; without, the text of the secret
   named by the alias (`map: {}`: `{}`, no fetch). Names: `projects/...` as written (at `latest` without
   `/versions/`), a bare name in GOOGLE_CLOUD_PROJECT (else GCP_PROJECT) at `latest`; the payload must be UTF-8. Then the row is upserted with a 600 s TTL:
   `INSERT ... ON CONFLICT (cache_key) DO UPDATE SET data_encrypted, expires_at, auto_renew, renew_config`.
Left out, as the warmer does not depend on it: the refresh a hit starts in its last 60 s, token providers.
"""

from __future__ import annotations

import base64
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import grpc
import yaml
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from jinja2 import ChainableUndefined
from jinja2.sandbox import SandboxedEnvironment

CACHE_TTL_SECONDS = 600
_templates = SandboxedEnvironment(undefined=ChainableUndefined, autoescape=False)


def rust_i64(text: str) -> int | None:
    """`text` as Rust's `str::parse::<i64>` reads it (the server's ids: a credential alias, a path's catalog id): an
    optional sign and ASCII digits, within 64 bits; else None."""
    if not re.fullmatch(r"[+-]?[0-9]+", text):
        return None
    value = int(text)
    return value if -2**63 <= value < 2**63 else None


def build_cache_key(keychain_name: str, catalog_id: int, scope_type: str, execution_id: int | None) -> str:
    """`src/db/queries/keychain.rs` build_cache_key: the key of every keychain row the server reads or writes."""
    if scope_type == "local":
        return f"{keychain_name}:{catalog_id}:{execution_id if execution_id is not None else 'local'}"
    if scope_type == "shared":
        return f"{keychain_name}:{catalog_id}:shared" + (f":{execution_id}" if execution_id is not None else "")
    return f"{keychain_name}:{catalog_id}:global"


@dataclass
class Answer:
    """What the server answered: from `credential`, a `keychain` hit, or the `provider` after a miss; None found."""

    source: str | None
    value: Any = field(default=None, repr=False)


class NoetlServerReads:
    """NoETL's server's credential lookup over one connection to NoETL's database (schema `schema`)."""

    def __init__(self, conn: asyncpg.Connection, schema: str = "noetl", *, encryption_key: str | None = None,
                 kms_endpoint: str | None = None, kms_key: str | None = None,
                 secret_manager_endpoint: str | None = None, project: str | None = None, server_region: str = ""):
        self.conn, self.schema = conn, schema
        self.server_region = server_region
        self._kek = AESGCM(base64.b64decode(encryption_key)) if encryption_key else None
        self._kms_endpoint, self._kms_key = kms_endpoint, kms_key
        self._sm_endpoint, self._project = secret_manager_endpoint, project
        self.provider_fetches = 0  # Secret Manager calls the server made itself

    async def get_credential(self, alias: str, execution_id: int) -> Answer:
        s = self.schema
        credential = None
        if (credential_id := rust_i64(alias)) is not None:
            credential = await self.conn.fetchrow(f"SELECT data_encrypted FROM {s}.credential WHERE id = $1",
                                                  credential_id)
        credential = credential or await self.conn.fetchrow(
            f"SELECT data_encrypted FROM {s}.credential WHERE name = $1", alias)
        if credential is not None:
            return Answer("credential", self.open(credential["data_encrypted"]))
        start = await self.conn.fetchrow(
            f"SELECT catalog_id, context->'workload' AS workload FROM {s}.event WHERE execution_id = $1 "
            "AND event_type IN ('playbook.initialized', 'playbook_started') LIMIT 1", execution_id)
        if start is None:
            return Answer(None)
        catalog_id = start["catalog_id"]
        workload = json.loads(start["workload"]) if start["workload"] else {}
        key = build_cache_key(alias, catalog_id, "local", execution_id)
        row = await self.conn.fetchrow(
            f"SELECT cache_key, catalog_id, keychain_name, scope_type, execution_id, data_encrypted, expires_at, "
            f"auto_renew, renew_config, access_count, accessed_at, created_at FROM {s}.keychain WHERE cache_key = $1",
            key)
        if row is not None:
            assert None not in (row["access_count"], row["auto_renew"], row["created_at"]), \
                "a NULL the server's row model cannot decode"
            if row["expires_at"] >= await self.conn.fetchval("SELECT now()"):
                await self.conn.execute(f"UPDATE {s}.keychain SET access_count = access_count + 1, "
                                        "accessed_at = NOW() WHERE cache_key = $1", key)
                try:
                    return Answer("keychain", self.open(row["data_encrypted"]))
                except Exception:  # a cache error is a miss, never a failure
                    pass
        value = await self._resolve(catalog_id, alias, workload)
        if value is None:
            return Answer(None)
        await self.conn.execute(
            f"INSERT INTO {s}.keychain (cache_key, catalog_id, keychain_name, credential_type, cache_type, scope_type, "
            "execution_id, data_encrypted, expires_at, auto_renew, renew_config) "
            "VALUES ($1, $2, $3, 'secret', 'secret', 'local', $4, $5, now() + make_interval(secs => $6), false, NULL) "
            "ON CONFLICT (cache_key) DO UPDATE SET data_encrypted = EXCLUDED.data_encrypted, "
            "expires_at = EXCLUDED.expires_at, auto_renew = EXCLUDED.auto_renew, renew_config = EXCLUDED.renew_config",
            key, catalog_id, alias, execution_id, self.seal(value), CACHE_TTL_SECONDS)
        return Answer("provider", value)

    async def _resolve(self, catalog_id: int, alias: str, workload: dict[str, Any]) -> Any:
        content = await self.conn.fetchval(f"SELECT content FROM {self.schema}.catalog WHERE catalog_id = $1",
                                           catalog_id)
        playbook = yaml.safe_load(content or "") or {}
        entry = next((e for e in playbook.get("keychain") or [] if e.get("name") == alias), None)
        if entry is None or entry.get("provider") != "gcp":
            return None
        region = entry.get("region") or self.server_region
        policy, allowed = entry.get("residency") or "none", entry.get("allowed_regions") or []
        if (region and policy == "strict" and region != self.server_region
                and not (self.server_region and self.server_region in allowed)):
            return None  # ResidencyViolation: refused before any fetch
        if entry.get("map") is None:
            return await self._fetch(alias)
        return {f: await self._fetch(_templates.from_string(t).render(workload)) for f, t in entry["map"].items()}

    async def _fetch(self, name: str) -> str:
        from google.cloud.secretmanager_v1 import SecretManagerServiceAsyncClient
        from google.cloud.secretmanager_v1.services.secret_manager_service.transports import (
            SecretManagerServiceGrpcAsyncIOTransport,
        )

        if not name.startswith("projects/"):
            name = f"projects/{self._project}/secrets/{name}"
        if "/versions/" not in name:
            name += "/versions/latest"
        transport = SecretManagerServiceGrpcAsyncIOTransport(channel=grpc.aio.insecure_channel(self._sm_endpoint))
        client = SecretManagerServiceAsyncClient(transport=transport)
        try:
            answer = await client.access_secret_version(name=name)
        finally:
            await transport.close()
        self.provider_fetches += 1
        return answer.payload.data.decode("utf-8")

    # --- the envelope (src/crypto/envelope.rs, encryption.rs, keymanager.rs, kms_gcp.rs) ---------------------------
    def open(self, stored: str) -> Any:
        envelope = json.loads(stored.strip())
        if envelope["v"] != 1 or envelope["alg"] != "AES-256-GCM":
            raise ValueError("not a wallet envelope record")
        data_key = self._unwrap(envelope["dek"])
        sealed = base64.b64decode(envelope["ct"])
        return json.loads(AESGCM(data_key).decrypt(sealed[:12], sealed[12:], None))

    def seal(self, value: Any) -> str:
        data_key, nonce = os.urandom(32), os.urandom(12)
        sealed = nonce + AESGCM(data_key).encrypt(nonce, json.dumps(value).encode(), None)
        if self._kms_key:
            wrapped, version = self._kms("encrypt", name=self._kms_key, plaintext=data_key)
            dek = {"p": "gcp-kms", "kid": self._kms_key, "kv": version, "ct": base64.b64encode(wrapped).decode()}
        else:
            key_nonce = os.urandom(12)
            wrapped = key_nonce + self._kek.encrypt(key_nonce, data_key, None)
            dek = {"p": "local", "kid": "env:NOETL_ENCRYPTION_KEY", "kv": "v1", "ct": base64.b64encode(wrapped).decode()}
        return json.dumps({"v": 1, "alg": "AES-256-GCM", "ct": base64.b64encode(sealed).decode(), "dek": dek})

    def _unwrap(self, dek: dict[str, str]) -> bytes:
        wrapped = base64.b64decode(dek["ct"])
        if dek["p"] == "local":
            if self._kek is None:
                raise ValueError("LocalDevKms cannot unwrap without NOETL_ENCRYPTION_KEY")
            return self._kek.decrypt(wrapped[:12], wrapped[12:], None)
        if dek["p"] == "gcp-kms":
            return self._kms("decrypt", name=dek["kid"], ciphertext=wrapped)
        raise ValueError(f"no key manager for provider {dek['p']!r}")

    def _kms(self, method: str, **request: Any):
        """Cloud KMS through the official client, on the endpoint NoETL's server would reach."""
        from google.cloud import kms_v1
        from google.cloud.kms_v1.services.key_management_service.transports import KeyManagementServiceGrpcTransport

        channel = grpc.insecure_channel(self._kms_endpoint)
        try:
            client = kms_v1.KeyManagementServiceClient(transport=KeyManagementServiceGrpcTransport(channel=channel))
            if method == "decrypt":
                return bytes(client.decrypt(request=request).plaintext)
            answer = client.encrypt(request=request)
            _, found, version = answer.name.rpartition("cryptoKeyVersions/")
            return bytes(answer.ciphertext), version if found and version else "primary"
        finally:
            channel.close()

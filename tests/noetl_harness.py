"""NoETL as the noetl tests meet it: its playbook in its catalog, its start records, its server's reads
(devtools/noetl_server.py), and the worker's parts with the noetl target. The fixtures are re-exported by
conftest.py."""

import pytest

from devtools.noetl_samples import as_message, rust_playbook_started
from devtools.noetl_schema import record_event, register_playbook
from devtools.noetl_server import NoetlServerReads
from streams.batches import Record
from streams.catalog import Catalog
from streams.invalidate import Invalidator
from streams.targets import open_targets
from streams.warm import Warmer

from .conftest import make_settings

PROJECT = "test-project"
PLAYBOOK = """\
apiVersion: noetl.io/v2
kind: Playbook
metadata:
  name: noetl_keychain
  path: tests/noetl/keychain
workload:
  api_secret: projects/{project}/secrets/{mapped}
keychain:
  - name: openai_token
    kind: secrets
    provider: gcp
    scope: global
    auth: '{{{{ gcp_auth }}}}'
    map:
      api_key: '{{{{ api_secret }}}}'
      org: {org}
  - name: {plain}
    kind: secrets
    provider: gcp
  - name: pg_creds
    kind: credential
    credential: pg_k8s
  - name: aws_creds
    kind: secrets
    provider: aws
    map:
      key: prod/api
  - name: legacy_token
    kind: secret_manager
    map:
      token: '{{{{ api_secret }}}}'
  - name: from_a_step
    kind: secrets
    provider: gcp
    map:
      value: '{{{{ fetch.result.secret }}}}'
workflow:
  - step: start
    tool:
      kind: http
      url: https://api.example.com
      headers:
        Authorization: 'Bearer {{{{ keychain.openai_token.api_key }}}}'
"""


class Noetl:
    """This test's NoETL: its tables, its catalog row, its start records, and its server's reads."""

    def __init__(self, db, schema, settings, names, catalog_id):
        self.db, self.schema, self.settings, self.names, self.catalog_id = db, schema, settings, names, catalog_id
        self.server = NoetlServerReads(db, schema, encryption_key=settings.noetl_encryption_key.get_secret_value()
                                       if settings.noetl_encryption_key else None,
                                       kms_endpoint=settings.kms_endpoint, kms_key=settings.noetl_gcp_kms_key,
                                       secret_manager_endpoint=settings.secret_manager_endpoint, project=PROJECT)

    async def started(self, execution_id: int, parent: int | None = None) -> Record:
        """NoETL's server starting an execution: its start record in its event table, and on the wire."""
        row = rust_playbook_started(execution_id, self.catalog_id, "tests/noetl/keychain",
                                    {"api_secret": f"projects/{PROJECT}/secrets/{self.names['mapped']}",
                                     "gcp_auth": "google_oauth"})
        row["parent_execution_id"] = parent
        await record_event(self.db, self.schema, row)
        return Record(*as_message(row))

    async def row(self, key: str):
        return await self.db.fetchrow(f"SELECT * FROM {self.schema}.keychain WHERE cache_key = $1", key)

    async def rows(self) -> int:
        return await self.db.fetchval(f"SELECT count(*) FROM {self.schema}.keychain")


@pytest.fixture(params=["same database", "KEYCHAIN_CATALOG_DSN"])
def noetl_settings(request, stack, schema, key_spec, noetl_schema, noetl_key):
    """The worker's settings for the noetl target; NoETL's tables reached over the keychain's own connections (one
    transaction), or over KEYCHAIN_CATALOG_DSN (a pool and a transaction of their own)."""
    catalog_dsn = stack.env["KEYCHAIN_DSN"] if request.param == "KEYCHAIN_CATALOG_DSN" else None
    return make_settings(stack, schema, key_spec, target="noetl", catalog_schema=noetl_schema,
                         catalog_dsn=catalog_dsn, noetl_encryption_key=noetl_key, google_cloud_project=PROJECT)


async def warm_parts(settings, keychain):
    targets = await open_targets(settings, keychain)
    warmer = Warmer(settings, keychain, Catalog(settings, keychain.pool), targets)
    return warmer, Invalidator(settings, keychain, warmer, keychain.source), targets


@pytest.fixture
async def noetl(noetl_db, noetl_schema, noetl_settings, noetl_secrets, execution_id):
    catalog_id = execution_id + 900
    await register_playbook(noetl_db, noetl_schema, catalog_id, "tests/noetl/keychain",
                            PLAYBOOK.format(project=PROJECT, **noetl_secrets))
    return Noetl(noetl_db, noetl_schema, noetl_settings, noetl_secrets, catalog_id)


@pytest.fixture
async def parts(noetl_settings, keychain, noetl):
    warmer, invalidator, targets = await warm_parts(noetl_settings, keychain)
    yield warmer, invalidator
    for target in targets:
        await target.close()


def calls(sm, noetl_secrets) -> int:
    return sum(sm.access_count(secret_id) for secret_id in noetl_secrets.values())


def counts(counter) -> dict[str, float]:
    return {s.labels.get("outcome") or s.labels.get("reason") or "total": s.value
            for m in counter.collect() for s in m.samples if s.name.endswith("_total")}

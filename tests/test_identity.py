"""One identity for a secret (issue 31): two projects with the same secret ids, and pinned and `latest` references of
one secret in one map, never share a row, a fence, a flight, a summary or a verdict. Against real PostgreSQL and
the Secret Manager test server serving two projects (prod and staging, each by id and by number)."""

import asyncio
import random
from datetime import datetime, timezone

import grpc
import pytest

from keychain import Keychain, SecretManagerSource
from keychain.errors import SecretSourceError
from keychain.invalidation import Selection
from keychain.model import Scope
from keychain.refs import SecretIdentity, SecretRef
from streams import metrics
from streams.invalidate import Invalidator
from streams.notices import notice_from_pubsub
from streams.resolve import Want
from streams.targets.base import Filled
from streams.targets.keychain import KeychainTarget
from streams.warm import Warmer

from .conftest import make_settings


class Projects:
    """prod and staging, each serving a secret `db-<unique>` of its own value (and a second version in prod)."""

    def __init__(self, sm, unique):
        self.sm = sm
        self.secret = f"db-{unique}"
        self.prod, self.stg = f"prod-{unique}", f"stg-{unique}"
        self.numbers = {self.prod: str(random.randrange(10**11, 10**12)),
                        self.stg: str(random.randrange(10**11, 10**12))}
        for project, number in self.numbers.items():
            sm.add_project(project, number)
            sm.create_secret(self.secret, project=project)
            sm.add_version(self.secret, f"{project}-v1", project=project)
        sm.add_version(self.secret, f"{self.prod}-v2", project=self.prod)

    def ref(self, project: str, version: str = "latest") -> SecretRef:
        return SecretRef.parse(f"projects/{project}/secrets/{self.secret}/versions/{version}")

    def identity(self, project: str) -> SecretIdentity:
        return SecretIdentity(self.numbers[project], self.secret)

    def notice(self, event_type: str, project: str, version: str | None = None):
        name = f"projects/{self.numbers[project]}/secrets/{self.secret}"
        attributes = {"eventType": event_type, "secretId": name, "dataFormat": "JSON_API_V1",
                      "timestamp": datetime.now(timezone.utc).isoformat()}
        if version:
            attributes["versionId"] = f"{name}/versions/{version}"
        return notice_from_pubsub(f"m-{random.getrandbits(64)}", attributes, b"{}", None)


@pytest.fixture
def projects(sm, unique):
    return Projects(sm, unique)


@pytest.fixture
def parts(stack, settings, keychain, key_spec):
    tuned = make_settings(stack, settings.schema_name, key_spec, warm_deadline_seconds=5.0)
    warmer = Warmer(tuned, keychain)
    return warmer, Invalidator(tuned, keychain, warmer, SecretManagerSource(tuned))


def single(name, ref, execution_id=None):
    return Want(name, Scope.of(execution_id=execution_id), ((None, ref),))


async def value(keychain, name, execution_id=None):
    lookup = await keychain.get(name, execution_id=execution_id)
    return lookup.value if lookup else lookup.outcome


# --- 1. a reader never gets another project's or another version's secret -------------------------------------------
async def test_a_global_name_pointed_at_another_project_is_written_over_and_said(parts, keychain, projects):
    warmer, _ = parts
    repoints = metrics.GLOBAL_REPOINTS._value.get()
    await warmer.warm([single("db", projects.ref(projects.prod))])
    assert await value(keychain, "db") == f"{projects.prod}-v2"
    await warmer.warm([single("db", projects.ref(projects.stg))])  # playbook B: the same name, staging's secret
    assert await value(keychain, "db") == f"{projects.stg}-v1"
    assert metrics.GLOBAL_REPOINTS._value.get() == repoints + 1
    await warmer.warm([single("db", projects.ref(projects.stg))])  # the same again: already warm, nothing written
    assert metrics.GLOBAL_REPOINTS._value.get() == repoints + 1


async def test_a_global_name_pointed_at_another_version_is_written_over(parts, keychain, projects):
    warmer, _ = parts
    await warmer.warm([single("db", projects.ref(projects.prod, "1"))])
    assert await value(keychain, "db") == f"{projects.prod}-v1"
    await warmer.warm([single("db", projects.ref(projects.prod, "2"))])
    assert await value(keychain, "db") == f"{projects.prod}-v2"
    await warmer.warm([single("db", projects.ref(projects.prod))])  # latest is v2, but `latest` is another pointer
    assert (await keychain.pool.fetchval("SELECT sources->0->>'ref' FROM keychain WHERE credential_name = 'db'")
            == str(projects.ref(projects.prod)))


async def test_a_map_with_its_fields_swapped_is_written_over(parts, keychain, projects):
    warmer, _ = parts
    prod, stg = projects.ref(projects.prod), projects.ref(projects.stg)
    await warmer.warm([Want("pair", Scope.of(), (("a", prod), ("b", stg)))])
    await warmer.warm([Want("pair", Scope.of(), (("a", stg), ("b", prod)))])
    assert await value(keychain, "pair") == {"a": f"{projects.stg}-v1", "b": f"{projects.prod}-v2"}


async def test_a_project_named_by_id_compares_equal_to_its_number(parts, keychain, projects):
    """The row of `projects/prod-id/...` holds Secret Manager's answer (by number): a want naming the project by
    number is the same value, and is not fetched or written again."""
    warmer, _ = parts
    await warmer.warm([single("db", projects.ref(projects.prod))])
    calls = projects.sm.access_count(projects.secret)
    by_number = SecretRef.parse(f"projects/{projects.numbers[projects.prod]}/secrets/{projects.secret}/versions/latest")
    refused, written = await warmer.warm([single("db", by_number)])
    assert (refused, written) == ({}, 0)
    assert projects.sm.access_count(projects.secret) == calls
    assert await keychain.pool.fetchval("SELECT project_number FROM keychain_project WHERE project_id = $1",
                                        projects.prod) == projects.numbers[projects.prod]


async def test_two_readers_of_one_name_with_other_references_each_get_their_own(keychain, projects, execution_id):
    projects.sm.delay_seconds = 0.05  # both misses are in flight at once
    prod, stg = await asyncio.gather(
        keychain.get_or_fetch("db", projects.ref(projects.prod), execution_id=execution_id),
        keychain.get_or_fetch("db", projects.ref(projects.stg), execution_id=execution_id))
    assert (prod.value, stg.value) == (f"{projects.prod}-v2", f"{projects.stg}-v1")
    assert projects.sm.access_count(projects.secret, project=projects.prod) == 1
    assert projects.sm.access_count(projects.secret, project=projects.stg) == 1


# --- 2. a fence per identity, and a pair per value ------------------------------------------------------------------
async def test_latest_and_a_pinned_version_of_one_secret_in_one_map_are_fenced_each(keychain, projects, execution_id):
    """`latest` fetched before an invalidation and `versions/1` after it: the old `latest` value is never written."""
    latest, pinned = projects.ref(projects.prod), projects.ref(projects.prod, "1")
    want = Want("map", Scope.of(execution_id=execution_id), (("now", latest), ("first", pinned)))
    early = await keychain.fetcher.fetch(latest)  # v2, under generation 0
    projects.sm.add_version(projects.secret, f"{projects.prod}-v3", project=projects.prod)
    await keychain.maintenance.invalidate(Selection.matching(projects.identity(projects.prod), {"pinned": False}))
    late = await keychain.fetcher.fetch(pinned)  # under generation 1
    # the first answer for prod taught its number: fenced on the unknown project before it, on the number after it
    identity = projects.identity(projects.prod)
    assert (early.fence, late.fence) == (identity.unknown_project.key, identity.key)
    outcome = await KeychainTarget(keychain, project=None).write(
        [Filled(want, {str(latest): early, str(pinned): late})])
    assert outcome.written == [] and len(outcome.fenced) == 1
    assert await value(keychain, "map", execution_id) == "miss"


async def test_an_invalidation_of_one_project_fences_its_value_beside_another_projects(keychain, projects,
                                                                                     execution_id):
    prod, stg = projects.ref(projects.prod), projects.ref(projects.stg)
    want = Want("both", Scope.of(execution_id=execution_id), (("prod", prod), ("stg", stg)))
    for ref in (prod, stg):  # both projects' numbers learned: each fetch is fenced on its own project's secret
        await keychain.fetcher.fetch(ref, reuse=False)
    early = await keychain.fetcher.fetch(prod, reuse=False)
    await keychain.maintenance.invalidate(Selection.matching(projects.identity(projects.prod), {}))
    late = await keychain.fetcher.fetch(stg, reuse=False)
    assert late.fence == projects.identity(projects.stg).key and late.generation == 0  # staging was not invalidated
    outcome = await KeychainTarget(keychain, project=None).write([Filled(want, {str(prod): early, str(stg): late})])
    assert outcome.written == [] and len(outcome.fenced) == 1


async def test_a_notice_of_one_project_never_touches_the_others_rows(parts, keychain, projects, execution_id):
    warmer, invalidator = parts
    await warmer.warm([single("p", projects.ref(projects.prod), execution_id),
                       single("s", projects.ref(projects.stg), execution_id)])
    projects.sm.add_version(projects.secret, f"{projects.stg}-v2", project=projects.stg)
    applied = await invalidator.apply(projects.notice("SECRET_VERSION_ADD", projects.stg, "2"))
    assert applied.changed == 1
    assert await value(keychain, "s", execution_id) == f"{projects.stg}-v2"
    assert await value(keychain, "p", execution_id) == f"{projects.prod}-v2"
    assert (await keychain.maintenance.generations([projects.identity(projects.prod)]))[
        projects.identity(projects.prod)] == 0


# --- 3. reconciliation by identity ------------------------------------------------------------------------------------
async def test_reconciliation_compares_each_project_with_its_own_latest(parts, keychain, projects, execution_id):
    warmer, invalidator = parts
    await warmer.warm([single("p", projects.ref(projects.prod), execution_id),
                       single("s", projects.ref(projects.stg), execution_id)])
    held = {r["secret"] for r in await keychain.pool.fetch("SELECT secret FROM keychain_latest_held")}
    assert held == {projects.identity(projects.prod).key, projects.identity(projects.stg).key}
    assert await invalidator.reconcile() == 0
    projects.sm.add_version(projects.secret, f"{projects.stg}-v2", project=projects.stg)  # its notice is lost
    prod_calls = projects.sm.access_count(projects.secret, project=projects.prod)
    assert await invalidator.reconcile() == 1
    assert await value(keychain, "s", execution_id) == f"{projects.stg}-v2"
    assert await value(keychain, "p", execution_id) == f"{projects.prod}-v2"
    assert projects.sm.access_count(projects.secret, project=projects.prod) == prod_calls  # prod was not touched
    assert await invalidator.reconcile() == 0


async def test_a_notice_of_one_project_keeps_the_others_summary(parts, keychain, projects, execution_id):
    warmer, invalidator = parts
    await warmer.warm([single("p", projects.ref(projects.prod), execution_id),
                       single("s", projects.ref(projects.stg), execution_id)])
    projects.sm.add_version(projects.secret, f"{projects.prod}-v3", project=projects.prod)
    await invalidator.apply(projects.notice("SECRET_VERSION_ADD", projects.prod, "3"))
    held = {(r["secret"], r["version"]) for r in await keychain.pool.fetch(
        "SELECT secret, version FROM keychain_latest_held")}
    assert held == {(projects.identity(projects.prod).key, "3"), (projects.identity(projects.stg).key, "1")}


# --- 4. an operator's invalidation fetches anew ----------------------------------------------------------------------
@pytest.mark.parametrize("door", ["credential", "execution"])
async def test_an_operators_invalidation_fences_and_fetches_fresh(parts, keychain, projects, execution_id, door):
    warmer, invalidator = parts
    await warmer.warm([single("db", projects.ref(projects.prod), execution_id)])
    assert await value(keychain, "db", execution_id) == f"{projects.prod}-v2"
    projects.sm.add_version(projects.secret, f"{projects.prod}-v3", project=projects.prod)  # no notice yet
    identity = projects.identity(projects.prod)
    before = (await keychain.maintenance.generations([identity]))[identity]
    selection = Selection.of(credential="db") if door == "credential" else Selection.of(execution_id=execution_id)
    await invalidator.invalidate(selection, cause="operator")
    # fetched again, not taken from the window of the warm a moment ago; and fenced against any fetch in flight
    assert await value(keychain, "db", execution_id) == f"{projects.prod}-v3"
    assert (await keychain.maintenance.generations([identity]))[identity] == before + 1


async def test_an_operator_naming_a_project_nobody_learned_reaches_every_project(keychain, projects):
    ghost = f"never-{projects.secret}"
    for name, project in (("p", projects.prod), ("s", projects.stg)):
        await keychain.get_or_fetch(name, projects.ref(project), scope="global")
    # an id no answer ever named: it may be either project, so both are reached
    assert await keychain.maintenance.invalidate(
        Selection.of(secret=f"projects/{ghost}/secrets/{projects.secret}")) == 2
    for name, project in (("p", projects.prod), ("s", projects.stg)):
        await keychain.get_or_fetch(name, projects.ref(project), scope="global")
    # a learned id is its number: only that project's row
    assert await keychain.maintenance.invalidate(
        Selection.of(secret=f"projects/{projects.stg}/secrets/{projects.secret}")) == 1
    assert (await keychain.get("p")).outcome == "hit" and (await keychain.get("s")).outcome == "stale"


# --- 5. the negative cache forgives ------------------------------------------------------------------------------------
async def failure(keychain, ref):
    return await keychain.pool.fetchrow(
        "SELECT attempts, secret, retry_at - now() AS wait FROM keychain_fetch_failure WHERE secret_ref = $1", str(ref))


async def test_a_success_resets_the_backoff(keychain, projects, execution_id):
    ref = projects.ref(projects.prod, "2")
    for _ in range(3):
        projects.sm.inject(grpc.StatusCode.PERMISSION_DENIED, times=1, secret=projects.secret)
        await keychain.pool.execute("UPDATE keychain_fetch_failure SET retry_at = now()")
        with pytest.raises(SecretSourceError):
            await keychain.fetcher.fetch(ref, reuse=False)
    assert (await failure(keychain, ref))["attempts"] == 3
    await keychain.pool.execute("UPDATE keychain_fetch_failure SET retry_at = now()")  # its backoff ran out
    assert (await keychain.fetcher.fetch(ref, reuse=False)).value.text == f"{projects.prod}-v2"  # permission restored
    assert await failure(keychain, ref) is None
    projects.sm.inject(grpc.StatusCode.PERMISSION_DENIED, times=1, secret=projects.secret)
    with pytest.raises(SecretSourceError):
        await keychain.fetcher.fetch(ref, reuse=False)
    refused = await failure(keychain, ref)
    assert refused["attempts"] == 1 and refused["wait"].total_seconds() <= keychain.settings.negative_ttl_seconds
    assert refused["secret"] == projects.identity(projects.prod).key


async def test_an_enabled_version_clears_its_refusal(parts, keychain, projects, execution_id):
    _, invalidator = parts
    ref = projects.ref(projects.prod, "1")
    version = f"projects/{projects.prod}/secrets/{projects.secret}/versions/1"
    projects.sm.set_state(version, "DISABLED")
    with pytest.raises(SecretSourceError):
        await keychain.fetcher.fetch(ref)
    assert await keychain.fetcher.fetch(ref) == "FAILED_PRECONDITION"  # remembered: not asked again
    projects.sm.set_state(version, "ENABLED")
    await invalidator.apply(projects.notice("SECRET_VERSION_ENABLE", projects.prod, "1"))
    assert await failure(keychain, ref) is None
    assert (await keychain.get_or_fetch("first", ref, execution_id=execution_id)).value == f"{projects.prod}-v1"


# --- migration ----------------------------------------------------------------------------------------------------------
async def test_rows_written_before_0011_get_their_identity(settings, projects):
    """Rows, copies, generations, refusals and the summary as 0010 left them: after `keychain migrate` each `sources`
    element has its identity (Secret Manager's name by number where it answered; a learned number, or unknown,
    where it refused), the project ids are learned, and a second migrate changes nothing."""
    import asyncpg

    from keychain.migrate import migrate
    from keychain.queries import migrations

    prod, number = projects.prod, projects.numbers[projects.prod]
    conn = await asyncpg.connect(settings.dsn)
    try:
        await conn.execute(f"CREATE SCHEMA {settings.schema_name}; SET search_path TO {settings.schema_name}")
        await conn.execute("CREATE TABLE keychain_schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
                           "applied_at TIMESTAMPTZ NOT NULL DEFAULT now())")
        for migration in migrations()[:10]:
            await conn.execute(migration.sql)
            await conn.execute("INSERT INTO keychain_schema_migrations (version, name) VALUES ($1, $2)",
                               migration.version, migration.name)
        answered = (f'[{{"ref": "projects/{prod}/secrets/db/versions/latest", "secret_id": "db", "names": '
                    f'["projects/{prod}/secrets/db", "projects/{number}/secrets/db"], "pinned": false, '
                    f'"alias": false, "version": "4"}}]')
        refused = (f'[{{"ref": "projects/{prod}/secrets/gone/versions/1", "secret_id": "gone", "names": '
                   f'["projects/{prod}/secrets/gone", "*"], "pinned": true, "alias": false}}]')
        unknown = ('[{"ref": "projects/elsewhere/secrets/db/versions/2", "secret_id": "db", "names": '
                   '["projects/elsewhere/secrets/db", "*"], "pinned": true, "alias": false}]')
        for name, sources, state in (("a", answered, "ready"), ("r", refused, "failed"), ("u", unknown, "failed")):
            await conn.execute(
                "INSERT INTO keychain (credential_name, scope_type, state, error_code, key_id, data, sources, "
                "expires_at) VALUES ($1, 'global', $3, $4, 'k1', '\\x00', $2::jsonb, now() + interval '1 hour')",
                name, sources, state, None if state == "ready" else "NOT_FOUND")
        await conn.execute("SELECT keychain_hold_latest(array_agg(sources), array_agg(expires_at)) FROM keychain")
        await conn.execute("INSERT INTO keychain_secret_state (secret_id, generation) VALUES ('db', 3)")
        await conn.execute("INSERT INTO keychain_fetch_failure (secret_ref, error_code, retry_at) VALUES "
                           f"('projects/{prod}/secrets/gone/versions/1', 'NOT_FOUND', now())")
        assert (await migrate(conn, settings.schema_name))[0] == 11
        await conn.execute(f"SET search_path TO {settings.schema_name}")
        secrets = {r["credential_name"]: r["secret"] for r in await conn.fetch(
            "SELECT credential_name, sources->0->>'secret' AS secret FROM keychain")}
        assert secrets == {"a": f"projects/{number}/secrets/db", "r": f"projects/{number}/secrets/gone",
                           "u": "projects/*/secrets/db"}
        assert await conn.fetchval("SELECT project_number FROM keychain_project WHERE project_id = $1", prod) == number
        assert await conn.fetchval("SELECT secret FROM keychain_fetch_failure") == f"projects/{number}/secrets/gone"
        assert [tuple(r) for r in await conn.fetch("SELECT secret, version FROM keychain_latest_held")] == [
            (f"projects/{number}/secrets/db", "4")]
        assert await conn.fetchval("SELECT count(*) FROM keychain_secret_state") == 0  # short ids fence nothing now
        assert await migrate(conn, settings.schema_name) == []
    finally:
        await conn.close()
    async with Keychain(settings, source=SecretManagerSource(settings)) as kc:
        # a notice of project `number`'s db reaches its row and the unknown project's refusal of db, nothing else
        assert await kc.maintenance.invalidate(Selection.of(secret=f"projects/{number}/secrets/db")) == 2


async def test_a_refusal_a_notice_ends_is_asked_again_and_warmed(parts, keychain, projects, unique, execution_id):
    """A secret with no version yet: the warm records NOT_FOUND (the row refuses readers). Its first version's
    notice makes the refusal stale (it held no value, so it had broken the table's constraint and the whole
    invalidation), forgets the remembered refusal, and the re-warm writes the value."""
    warmer, invalidator = parts
    empty = f"empty-{unique}"
    projects.sm.create_secret(empty, project=projects.stg)
    ref = SecretRef.parse(f"projects/{projects.stg}/secrets/{empty}/versions/latest")
    refused, _ = await warmer.warm([single("later", ref, execution_id)])
    assert set(refused.values()) == {"NOT_FOUND"}
    assert await keychain.pool.fetchval("SELECT state FROM keychain WHERE credential_name = 'later'") == "failed"
    projects.sm.add_version(empty, "first-value", project=projects.stg)
    name = f"projects/{projects.numbers[projects.stg]}/secrets/{empty}"
    notice = notice_from_pubsub(f"m-{random.getrandbits(64)}", {
        "eventType": "SECRET_VERSION_ADD", "secretId": name, "versionId": f"{name}/versions/1",
        "timestamp": datetime.now(timezone.utc).isoformat()}, b"{}", None)
    applied = await invalidator.apply(notice)
    assert (applied.changed, applied.refreshed) == (1, 1)
    assert await value(keychain, "later", execution_id) == "first-value"

"""Real services, started once per test session; each test gets its own schema, secrets and ids."""

from __future__ import annotations

import asyncio
import os
import uuid

import asyncpg
import pytest

from keychain import Keychain, SecretManagerSource
from keychain.crypto import KeyRing
from devtools.stack import LocalStack, pubsub_unavailable_reason
from streams.settings import WorkerSettings


def pytest_collection_modifyitems(items) -> None:
    """Tests that need the real services are marked `services`; `make check` runs the others, in seconds. Tests that
    need the Pub/Sub emulator (`pubsub`) skip with the reason where it is not installed, except in CI (CI=true),
    where they fail: CI must run them."""
    missing = pubsub_unavailable_reason()
    for item in items:
        if "stack" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.services)
        if missing and item.get_closest_marker("pubsub"):
            if os.environ.get("CI"):
                item.add_marker(pytest.mark.usefixtures("pubsub_required_in_ci"))
            else:
                item.add_marker(pytest.mark.skip(reason=missing))


@pytest.fixture
def pubsub_required_in_ci():
    pytest.fail(f"CI runs the Pub/Sub tests: {pubsub_unavailable_reason()}")


@pytest.fixture(scope="session")
def stack():
    """Started once, by the first test that needs it (never for `make check`)."""
    with LocalStack() as running:
        yield running
        check_no_plaintext(running)  # before the services stop


@pytest.fixture(scope="session")
def secret_manager(stack):
    return stack.secret_manager


def check_no_plaintext(stack: LocalStack) -> None:
    """After the whole suite: no secret value the test server ever issued appears in any test schema's table, in
    anything a worker printed, or in any HTTP answer. Fails the session (an error at teardown) if one does."""
    from .streams_harness import HTTP_BODIES, WORKERS

    issued = [v for v in stack.secret_manager.issued if len(v) >= 8]
    # As text, and as the hex PostgreSQL prints for bytea: an unencrypted value in `data` would show that way.
    values = [v.decode() for v in issued] + [v.hex() for v in issued]
    dumps = asyncio.run(_dump_test_tables(stack.env["KEYCHAIN_DSN"]))
    places = {"table rows": dumps, "worker output": [w.output for w in WORKERS], "HTTP answers": HTTP_BODIES}
    for where, texts in places.items():
        leaked = [v for v in values for text in texts if v in text]
        assert not leaked, f"plaintext secret values found in {where}"
    CHECKED.append(f"no plaintext: {len(issued)} secret values checked against {len(dumps)} rows, "
                   f"{len(WORKERS)} worker outputs, {len(HTTP_BODIES)} HTTP answers")


CHECKED: list[str] = []


def pytest_terminal_summary(terminalreporter) -> None:
    for line in CHECKED:
        terminalreporter.write_line(line)


async def _dump_test_tables(dsn: str) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        schemas = await conn.fetch(
            "SELECT table_schema FROM information_schema.tables WHERE table_name = 'keychain' "
            "AND (table_schema LIKE 't\\_%' OR table_schema LIKE 'n\\_%')")  # ours, and NoETL's (noetl_schema)
        rows = []
        for (schema,) in schemas:
            rows += [r[0] for r in await conn.fetch(f'SELECT k::text FROM "{schema}".keychain k')]
        return rows
    finally:
        await conn.close()


@pytest.fixture
def sm(secret_manager):
    """The Secret Manager test server, with no faults or delay left over from another test."""
    secret_manager.clear_faults()
    yield secret_manager
    secret_manager.clear_faults()


@pytest.fixture
def unique():
    """A short unique token for names of this test's secrets, schemas and ids."""
    return uuid.uuid4().hex[:10]


@pytest.fixture
def execution_id():
    return int.from_bytes(os.urandom(7), "big")


@pytest.fixture
def schema(unique):
    return f"t_{unique}"


@pytest.fixture
def key_spec():
    return KeyRing.generate_spec("k1")


def make_settings(stack: LocalStack, schema: str, keys: str, **overrides) -> WorkerSettings:
    return WorkerSettings(
        dsn=stack.env["KEYCHAIN_DSN"],
        schema_name=schema,
        keys=keys,
        secret_manager_endpoint=stack.env["SECRET_MANAGER_ENDPOINT"],
        secret_manager_retry_initial_seconds=0.01,
        secret_manager_retry_max_seconds=0.05,
        **overrides,
    )


@pytest.fixture
def settings(stack, schema, key_spec):
    return make_settings(stack, schema, key_spec)


@pytest.fixture
def cli_env(stack, settings, key_spec):
    """Environment variables for a `keychain` subprocess reaching this test's schema."""
    from .streams_harness import process_env

    return process_env(stack, settings, key_spec)


@pytest.fixture
async def keychain(settings):
    async with Keychain(settings, source=SecretManagerSource(settings)) as kc:
        await kc.migrate()
        yield kc


@pytest.fixture
async def db(settings):
    """A plain connection to this test's schema, for looking at (and tampering with) the table directly."""
    conn = await asyncpg.connect(settings.dsn, server_settings={"search_path": settings.schema_name})
    yield conn
    await conn.close()


@pytest.fixture
def secret(sm, unique):
    """A fresh secret with one version; returns (secret id, the version's value)."""
    secret_id = f"s-{unique}"
    value = f"plaintext-{uuid.uuid4().hex}"
    sm.create_secret(secret_id)
    sm.add_version(secret_id, value)
    return secret_id, value


@pytest.fixture
async def streams(stack, settings, key_spec, unique, keychain):
    """A worker on this test's own topics, group and schema. Yields a small helper object."""
    from .streams_harness import Worker, create_topics, produce, worker_env

    class Streams:
        bootstrap = stack.env["KAFKA_BOOTSTRAP_SERVERS"]
        events = f"events-{unique}"
        dlq = f"dlq-{unique}"
        worker: Worker | None = None

        def start_worker(self, **extra):
            self.worker = Worker(worker_env(stack, settings, key_spec, unique, **extra)).start()
            return self.worker

        async def send(self, *messages):
            """Produce (key, value) pairs to this test's events topic, in order."""
            await produce(self.bootstrap, self.events, list(messages))

        async def rows(self, execution_id=None):
            if execution_id is None:
                return await keychain.pool.fetchval("SELECT count(*) FROM keychain")
            return await keychain.pool.fetchval("SELECT count(*) FROM keychain WHERE execution_id = $1", execution_id)

    helper = Streams()
    await create_topics(helper.bootstrap, helper.events, helper.dlq)
    yield helper
    if helper.worker is not None:
        helper.worker.stop()


# --- NoETL's own tables and key-encryption keys (the noetl target) -----------------------------------------------------
@pytest.fixture
def noetl_schema(unique):
    """Where this test's NoETL keeps its tables (NoETL's own `noetl`, in a real deployment)."""
    return f"n_{unique}"


@pytest.fixture
async def noetl_db(settings, noetl_schema):
    """NoETL's tables as NoETL's installation creates them, and a connection to NoETL's database."""
    from devtools.noetl_schema import create_noetl_tables

    conn = await asyncpg.connect(settings.dsn)
    await create_noetl_tables(conn, noetl_schema)
    yield conn
    await conn.close()


@pytest.fixture
def noetl_key():
    """NoETL's NOETL_ENCRYPTION_KEY."""
    import base64

    return base64.b64encode(os.urandom(32)).decode()


@pytest.fixture(scope="session")
def kms_server():
    """The Cloud KMS test server (the real gRPC API, for the official client)."""
    from devtools.kms_server import CloudKmsTestServer

    server = CloudKmsTestServer().start()
    yield server
    server.stop()


@pytest.fixture
def noetl_secrets(sm, unique):
    """The secrets the noetl tests' playbook names (devtools-free: the test server's own secrets)."""
    names = {"mapped": f"mapped-{unique}", "org": f"org-{unique}", "plain": f"plain-{unique}"}
    for secret_id in names.values():
        sm.create_secret(secret_id)
        sm.add_version(secret_id, f"value-of-{secret_id}")
    return names


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test shows what the workers it started printed (warnings, dead letters, tracebacks): a failure in CI
    can then be read from its log alone."""
    from .streams_harness import WORKERS

    if call.when == "setup":
        item.workers_before = len(WORKERS)
    outcome = yield
    report = outcome.get_result()
    if report.failed and call.when == "call":
        for n, worker in enumerate(WORKERS[getattr(item, "workers_before", 0):]):
            lines = [line.rstrip() for line in worker.lines
                     if any(word in line for word in ("WARNING", "ERROR", "Error", "dead letter", "Traceback", "  File "))]
            report.sections.append((f"worker {n} (warnings and errors)", "\n".join(lines[-150:])))


# NoETL's fixtures (tests/noetl_harness.py), for every test module that meets NoETL.
from .noetl_harness import noetl, noetl_settings, parts  # noqa: E402, F401

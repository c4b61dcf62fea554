"""deploy/debezium/: the Debezium connector configurations for NoETL's event table, checked offline against the
options Debezium and Kafka Connect document, and the messages they make fed to the real worker."""

import json
import re
from pathlib import Path

import pytest

from devtools.noetl_samples import CACHE_SIMPLE, debezium, finish_record, register, rust_playbook_started, step_records
from streams.events import FINISH_EVENTS, START_EVENTS
from streams.settings import WorkerSettings

from .streams_harness import wait_for

DEPLOY = Path(__file__).parent.parent / "deploy" / "debezium"
CONFIGS = ["noetl-event-connector.json", "noetl-event-connector-lifecycle-only.json"]

# The PostgreSQL connector's options, as Debezium's documentation lists them (connectors/postgresql.adoc).
POSTGRES_CONNECTOR = set("""
binary.handling.mode column.exclude.list column.include.list column.propagate.source.type connector.class
database.connection.factory.class database.dbname database.hostname database.initial.statements database.password
database.port database.sslcert database.sslfactory database.sslkey database.sslmode database.sslpassword
database.sslrootcert database.tcpKeepAlive database.user datatype.propagate.source.type decimal.handling.mode
event.processing.failure.handling.mode flush.lsn.source heartbeat.action.query heartbeat.interval.ms
hstore.handling.mode include.unknown.datatypes incremental.snapshot.chunk.size interval.handling.mode lsn.flush.mode
max.batch.size max.queue.size max.queue.size.in.bytes message.key.columns message.prefix.exclude.list
message.prefix.include.list money.fraction.digits name notification.enabled.channels plugin.name poll.interval.ms
provide.transaction.metadata publication.autocreate.mode publication.name publish.via.partition.root
retriable.restart.connector.wait.ms schema.exclude.list schema.include.list schema.refresh.mode
signal.enabled.channels skip.messages.without.change skipped.operations slot.drop.on.stop slot.failover
slot.max.retries slot.name slot.retry.delay.ms slot.stream.params snapshot.delay.ms snapshot.fetch.size
snapshot.include.collection.list snapshot.isolation.mode snapshot.lock.timeout.ms snapshot.locking.mode snapshot.mode
snapshot.select.statement.overrides status.update.interval.ms table.exclude.list table.include.list tasks.max
time.precision.mode tombstones.on.delete topic.heartbeat.prefix topic.prefix unavailable.value.placeholder
xmin.fetch.interval.ms
""".split())
# Kafka Connect's own connector options, and those of the transformations used (RegexRouter; Debezium's Filter).
CONNECT = {"key.converter", "value.converter", "key.converter.schemas.enable", "value.converter.schemas.enable",
           "transforms"}
TRANSFORMS = {"org.apache.kafka.connect.transforms.RegexRouter": {"type", "regex", "replacement"},
              "io.debezium.transforms.Filter": {"type", "language", "condition", "expression", "topic.regex",
                                                "null.handling.mode"}}
SNAPSHOT_MODES = {"always", "initial", "initial_only", "no_data", "never", "when_needed", "configuration_based",
                  "custom", "recovery"}


@pytest.mark.parametrize("name", CONFIGS)
def test_the_connector_configuration_uses_only_documented_options(name):
    document = json.loads((DEPLOY / name).read_text())
    config = document["config"]
    assert document["name"] and config["connector.class"] == "io.debezium.connector.postgresql.PostgresConnector"
    transforms = config["transforms"].split(",")
    for key in config:
        if key.startswith("transforms."):
            alias, _, option = key.removeprefix("transforms.").partition(".")
            assert alias in transforms, key
            assert option in TRANSFORMS[config[f"transforms.{alias}.type"]], key
        else:
            assert key in POSTGRES_CONNECTOR | CONNECT, f"{key} is not a documented option"
    assert config["plugin.name"] == "pgoutput" and config["snapshot.mode"] in SNAPSHOT_MODES
    assert config["table.include.list"] == "noetl.event" and config["publish.via.partition.root"] == "true"
    assert config["message.key.columns"] == "noetl.event:execution_id"  # one execution's records stay ordered
    assert config["key.converter.schemas.enable"] == config["value.converter.schemas.enable"] == "false"
    # Debezium names the topic topic.prefix.schema.table; the router sends it to the worker's events topic
    debezium_topic = f"{config['topic.prefix']}.noetl.event"
    route = next(a for a in transforms if config[f"transforms.{a}.type"].endswith("RegexRouter"))
    assert re.fullmatch(config[f"transforms.{route}.regex"], debezium_topic)
    assert config[f"transforms.{route}.replacement"] == WorkerSettings().events_topic


def test_the_optional_filter_keeps_exactly_the_records_the_worker_acts_on():
    config = json.loads((DEPLOY / CONFIGS[1]).read_text())["config"]
    condition = config["transforms.lifecycle.condition"]
    kept = set(re.findall(r"'([^']+)'", condition))
    assert kept == START_EVENTS | FINISH_EVENTS
    assert condition.startswith("value.after != null && ") and config["transforms.lifecycle.language"] == "jsr223.groovy"
    assert config["transforms"].split(",")[0] == "lifecycle"  # filtered before it is routed


async def test_the_worker_warms_and_purges_from_what_the_connector_emits(streams, settings, db, keychain, sm, secret,
                                                                         execution_id):
    secret_id, value = secret
    ref = f"projects/test-project/secrets/{secret_id}/versions/latest"
    catalog_id = execution_id + 3
    await register(db, settings.schema_name, catalog_id, "test/cache_simple", CACHE_SIMPLE)
    streams.start_worker(KEYCHAIN_CATALOG_SCHEMA=settings.schema_name, KEYCHAIN_CATALOG_WAIT_SECONDS="0.5")

    def emitted(row):  # as both configurations emit a new row: plain JSON, the key of message.key.columns
        return debezium(row, wrapped=False, key_columns=("execution_id",))

    started = rust_playbook_started(execution_id, catalog_id, "test/cache_simple", {"openai_secret_path": ref})
    # without the filter NoETL's step records come too; with it only the start and the finish
    await streams.send(emitted(started), *[emitted(r) for r in step_records(execution_id, catalog_id, "start")])
    await wait_for(lambda: streams.rows(execution_id), what="warmed from the connector's records")
    assert (await keychain.get(ref, execution_id=execution_id)).value == value
    await streams.send(emitted(finish_record(execution_id, catalog_id)))

    async def purged():
        return await streams.rows(execution_id) == 0

    await wait_for(purged, what="purged on the connector's finish record")

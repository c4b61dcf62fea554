"""The stream worker's settings: the library's (keychain/settings.py) and its own, read from the environment, with
every default in one place. `keychain/` knows none of these."""

from __future__ import annotations

from functools import lru_cache

from pydantic import SecretStr, field_validator

from keychain.settings import Settings, check_dsn, env, load_settings


class WorkerSettings(Settings):
    # --- Google Cloud / Kafka ----------------------------------------------------------------------------------
    google_cloud_project: str | None = env(
        "GOOGLE_CLOUD_PROJECT",
        default=None,
        description="Project of short Pub/Sub subscription names, and of `keychain:` entries without `map`.",
    )
    gcp_project: str | None = env(
        "GCP_PROJECT",
        default=None,
        description="Project of a bare secret name in NoETL's keychain entries when GOOGLE_CLOUD_PROJECT is unset (as "
        "NoETL's server reads them).",
    )
    pubsub_emulator_host: str | None = env(
        "PUBSUB_EMULATOR_HOST", default=None, description="The Google client's own variable for the emulator."
    )
    rotation_subscription: str | None = env(
        "KEYCHAIN_ROTATION_SUBSCRIPTION",
        default=None,
        description="Pub/Sub subscription of Secret Manager notifications (`projects/P/subscriptions/S` or `S`).",
    )
    kafka_bootstrap_servers: str = env(
        "KAFKA_BOOTSTRAP_SERVERS", default="127.0.0.1:9092", description="Kafka brokers, comma-separated."
    )
    events_topic: str = env(
        "KEYCHAIN_EVENTS_TOPIC", default="noetl.execution.events", description="Execution lifecycle events."
    )
    dlq_topic: str = env(
        "KEYCHAIN_DLQ_TOPIC", default="noetl.execution.events.dlq", description="Dead letters, with the reason."
    )
    rotations_topic: str = env(
        "KEYCHAIN_ROTATIONS_TOPIC", default="keychain.rotations", description="Secret Manager notices on Kafka."
    )

    # --- the stream worker ----------------------------------------------------------------------------------------
    app_id: str = env(
        "KEYCHAIN_APP_ID", default="keychain-warmer",
        description="Consumer group of the execution events (KEDA scales on its lag); faust's own group, for the "
        "rotation notices and the timers' leader, is KEYCHAIN_APP_ID-control.",
    )
    topic_partitions: int = env(
        "KEYCHAIN_TOPIC_PARTITIONS", default=8, ge=1, description="Partitions of topics the worker creates."
    )
    web_port: int = env(
        "KEYCHAIN_WEB_PORT", default=6066, ge=1, le=65535, description="HTTP port of the worker (health, metrics, admin)."
    )
    web_host: str = env(
        "KEYCHAIN_WEB_HOST", default="127.0.0.1",
        description="Address the HTTP server binds: this machine only unless set (`0.0.0.0` in a pod or container, "
        "for the probes and Prometheus; the admin endpoint then needs KEYCHAIN_ADMIN_TOKEN and a network policy).",
    )
    admin_token: SecretStr | None = env(
        "KEYCHAIN_ADMIN_TOKEN",
        default=None,
        description="Bearer token for POST /invalidate; unset disables the endpoint.",
    )
    data_dir: str = env(
        "KEYCHAIN_DATA_DIR", default="/tmp/keychain-warmer", description="Faust's scratch directory (no state)."
    )
    broker_session_timeout_seconds: float = env(
        "KEYCHAIN_BROKER_SESSION_TIMEOUT_SECONDS",
        default=10.0,
        gt=0,
        description="Consumer group session timeout: how long a replica that died without leaving (SIGKILL, a lost "
        "node) holds its partitions before the others take them over. Heartbeats go at a tenth of it.",
    )
    broker_rebalance_timeout_seconds: float = env(
        "KEYCHAIN_BROKER_REBALANCE_TIMEOUT_SECONDS",
        default=10.0,
        gt=0,
        description="How long a rebalance waits for members to rejoin (a member finishing its batch).",
    )
    consumer_fetch_max_wait_ms: int = env(
        "KEYCHAIN_CONSUMER_FETCH_MAX_WAIT_MS",
        default=500,
        ge=1,
        description="Longest a consumer fetch waits for records (events and notices). Apache Kafka answers a fetch as "
        "soon as a record arrives, so the wait costs no latency there and a long one keeps an idle worker idle; "
        "a broker that holds a fetch for its whole wait (the local tansu) delays every record by up to the wait: "
        "20 ms there (devtools/local.py), at about 0.05 s of CPU per second while idle.",
    )
    warm_batch_size: int = env(
        "KEYCHAIN_WARM_BATCH_SIZE", default=500, ge=1,
        description="Most events handled (and written) at once: a batch is what the consumer has received, up to this "
        "(one event when they come one at a time, full batches under a burst).",
    )
    warm_batches_in_flight: int = env(
        "KEYCHAIN_WARM_BATCHES_IN_FLIGHT", default=8, ge=1,
        description="Batches of execution events handled at once: the next starts while the earlier ones wait for "
        "Secret Manager or their write, so events that arrive during a fetch do not queue behind it.",
    )
    warm_deadline_seconds: float = env(
        "KEYCHAIN_WARM_DEADLINE_SECONDS",
        default=30.0,
        gt=0,
        description="How long a batch retries Secret Manager UNAVAILABLE before dead-lettering the event.",
    )
    max_event_bytes: int = env(
        "KEYCHAIN_MAX_EVENT_BYTES", default=1_048_576, ge=1, description="Larger events go to the dead-letter topic."
    )
    catalog_dsn: str | None = env(
        "KEYCHAIN_CATALOG_DSN",
        default=None,
        description="DSN of NoETL's database, when its tables are not in the keychain's database (its catalog is "
        "read; with the noetl target, its keychain written).",
    )
    catalog_schema: str = env(
        "KEYCHAIN_CATALOG_SCHEMA",
        default="noetl",
        pattern=r"^[a-z_][a-z0-9_]{0,62}$",
        description="Schema of NoETL's tables: `catalog` (start events that carry no playbook find it there), "
        "`credential` and, with the noetl target, `keychain`.",
    )

    # --- where the warm writes (streams/targets/) ---------------------------------------------------------------
    target: str = env(
        "KEYCHAIN_TARGET",
        default="keychain",
        pattern="^(keychain|noetl|both)$",
        description="Where the worker warms, purges, invalidates and sweeps: `keychain` (this project's table, read "
        "with the keychain library), `noetl` (NoETL's own `keychain` table, read by NoETL's server) or `both`.",
    )
    noetl_server_region: str = env(
        "NOETL_SERVER_REGION",
        default="",
        description="NoETL's server's region, as its server reads it: a keychain entry under `residency: strict` "
        "whose `region` differs (and whose `allowed_regions` do not name the server's) is not warmed for it.",
    )
    noetl_ttl_seconds: int = env(
        "KEYCHAIN_NOETL_TTL_SECONDS",
        default=600,
        gt=0,
        description="Lifetime of a row written to NoETL's keychain (NoETL's server writes its own with 600 s).",
    )
    noetl_kms_provider: str = env(
        "NOETL_KMS_PROVIDER",
        default="local",
        description="NoETL's key-encryption key provider, as NoETL's server reads it: `local` (NOETL_ENCRYPTION_KEY) or "
        "`gcp-kms` (NOETL_GCP_KMS_KEY).",
    )
    noetl_api_url: str | None = env(
        "KEYCHAIN_NOETL_API_URL",
        default=None,
        pattern=r"^https?://[^\s/]+(/[^\s]*)?$",
        description="NoETL's server (`http://noetl-server:8082`): set, the noetl target writes and invalidates NoETL's "
        "rows through its keychain API, which seals them itself: the warmer holds no NoETL key and writes nothing into "
        "NoETL's tables (purge and sweep still need DELETE on them). Unset: the rows are written directly.",
    )
    noetl_api_token: SecretStr | None = env(
        "KEYCHAIN_NOETL_API_TOKEN",
        default=None,
        description="Bearer token for the gateway in front of NoETL's server, when there is one.",
    )
    noetl_encryption_key: SecretStr | None = env(
        "NOETL_ENCRYPTION_KEY",
        default=None,
        description="NoETL's local key-encryption key (base64 of 32 bytes), the same as NoETL's server's (direct "
        "writes only).",
    )
    noetl_encryption_key_file: str | None = env(
        "NOETL_ENCRYPTION_KEY_FILE",
        default=None,
        description="A file holding NOETL_ENCRYPTION_KEY (a mounted secret; a trailing newline is stripped), when "
        "NOETL_ENCRYPTION_KEY is not set.",
    )
    noetl_gcp_kms_key: str | None = env(
        "NOETL_GCP_KMS_KEY",
        default=None,
        description="NoETL's Cloud KMS CryptoKey (projects/P/locations/L/keyRings/R/cryptoKeys/K), the same as NoETL's "
        "server's.",
    )
    kms_endpoint: str | None = env(
        "KMS_ENDPOINT",
        default=None,
        description="`host:port` of a local Cloud KMS gRPC server (plain, no TLS); unset = the real service.",
    )
    catalog_wait_seconds: float = env(
        "KEYCHAIN_CATALOG_WAIT_SECONDS",
        default=5.0,
        ge=0,
        description="How long a start event waits for its catalog row to appear before `playbook_not_found`.",
    )
    sweep_interval_seconds: float = env(
        "KEYCHAIN_SWEEP_INTERVAL_SECONDS", default=60.0, gt=0, description="How often the leader sweeps."
    )

    rewarm_mode: str = env(
        "KEYCHAIN_REWARM_MODE",
        default="refresh",
        pattern="^(refresh|drop)$",
        description="After an invalidation: `refresh` running executions' rows with the new version, or `drop` them.",
    )
    reconcile_interval_seconds: float = env(
        "KEYCHAIN_RECONCILE_INTERVAL_SECONDS",
        default=60.0,
        gt=0,
        description="How often the leader compares `latest` rows with Secret Manager (catches lost notices).",
    )

    @field_validator("catalog_dsn")
    @classmethod
    def _catalog_dsn(cls, value: str | None) -> str | None:
        return value if value is None else check_dsn(value)

    @property
    def noetl_project(self) -> str | None:
        """The project NoETL's server gives a bare secret name: GOOGLE_CLOUD_PROJECT, then GCP_PROJECT."""
        return self.google_cloud_project or self.gcp_project

    @property
    def broker_heartbeat_interval_seconds(self) -> float:
        """A tenth of the session timeout: well inside it, even with a heartbeat or two lost."""
        return self.broker_session_timeout_seconds / 10

    @property
    def targets(self) -> tuple[str, ...]:
        return ("keychain", "noetl") if self.target == "both" else (self.target,)


@lru_cache(maxsize=1)
def worker_settings_from_env() -> WorkerSettings:
    """Read once, at the worker's start: unknown KEYCHAIN_* variables are warned about then."""
    return load_settings(WorkerSettings, warn_unknown=True)

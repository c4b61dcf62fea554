"""Every setting of keychain-warmer, read from environment variables, with its default, in one place.

The environment variable names are the contract shared by the README, docker-compose.yml and deploy/.
"""

from __future__ import annotations

from functools import lru_cache

from pydantic import AliasChoices, Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from .errors import ConfigurationError


def env(name: str, *, description: str, **kwargs):
    """A field read from exactly one environment variable (or from its field name when built in code)."""
    return Field(validation_alias=AliasChoices(name), description=description, **kwargs)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(populate_by_name=True, extra="ignore", frozen=True)

    # --- the keychain table -------------------------------------------------------------------------------------
    dsn: str = env(
        "KEYCHAIN_DSN",
        default="postgresql://postgres@127.0.0.1:5432/postgres",
        description="PostgreSQL DSN of the database that holds the keychain.",
    )
    schema_name: str = env(
        "KEYCHAIN_SCHEMA",
        default="noetl",
        pattern=r"^[a-z_][a-z0-9_]{0,62}$",
        description="Schema of the keychain table (NoETL's is `noetl`).",
    )
    keys: SecretStr = env(
        "KEYCHAIN_KEYS",
        default=SecretStr(""),
        description="Key ring: comma-separated `kid:base64-of-32-bytes`; the first key encrypts, all decrypt.",
    )
    ttl_seconds: int = env(
        "KEYCHAIN_TTL_SECONDS", default=3600, gt=0, description="Default lifetime of a cached entry."
    )
    pool_min_size: int = env("KEYCHAIN_POOL_MIN_SIZE", default=1, ge=0, description="Smallest connection pool.")
    pool_max_size: int = env("KEYCHAIN_POOL_MAX_SIZE", default=10, ge=1, description="Largest connection pool.")
    fetch_lock_timeout_seconds: float = env(
        "KEYCHAIN_FETCH_LOCK_TIMEOUT_SECONDS",
        default=30.0,
        gt=0,
        description="How long a read-through waits for another process that is fetching the same secret.",
    )
    negative_ttl_seconds: int = env(
        "KEYCHAIN_NEGATIVE_TTL_SECONDS",
        default=60,
        gt=0,
        description="How long a NOT_FOUND / PERMISSION_DENIED answer is remembered before asking again.",
    )
    fence_retention_seconds: int = env(
        "KEYCHAIN_FENCE_RETENTION_SECONDS",
        default=7 * 86400,
        gt=0,
        description="How long a finished execution stays fenced against late writes (longer than any redelivery).",
    )
    sweep_batch_size: int = env(
        "KEYCHAIN_SWEEP_BATCH_SIZE", default=5000, gt=0, description="Expired rows deleted per sweep statement."
    )
    rekey_batch_size: int = env(
        "KEYCHAIN_REKEY_BATCH_SIZE", default=500, gt=0, description="Rows re-encrypted per rekey transaction."
    )

    # --- Secret Manager ---------------------------------------------------------------------------------------
    secret_manager_endpoint: str | None = env(
        "SECRET_MANAGER_ENDPOINT",
        default=None,
        description="`host:port` of a local Secret Manager gRPC server (plain, no TLS); unset = the real service.",
    )
    secret_manager_timeout_seconds: float = env(
        "SECRET_MANAGER_TIMEOUT_SECONDS", default=10.0, gt=0, description="Deadline of one Secret Manager call."
    )
    secret_manager_retry_attempts: int = env(
        "SECRET_MANAGER_RETRY_ATTEMPTS",
        default=5,
        ge=1,
        description="Attempts per access when Secret Manager answers UNAVAILABLE or times out.",
    )
    secret_manager_retry_initial_seconds: float = env(
        "SECRET_MANAGER_RETRY_INITIAL_SECONDS", default=0.2, gt=0, description="First retry backoff."
    )
    secret_manager_retry_max_seconds: float = env(
        "SECRET_MANAGER_RETRY_MAX_SECONDS", default=5.0, gt=0, description="Largest retry backoff."
    )

    # --- Google Cloud / Kafka (used by the streams) -----------------------------------------------------------
    google_cloud_project: str | None = env(
        "GOOGLE_CLOUD_PROJECT",
        default=None,
        description="Project of short Pub/Sub subscription names, and of `keychain:` entries without `map`.",
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
        "KEYCHAIN_APP_ID", default="keychain-warmer", description="Faust app id = Kafka consumer group."
    )
    topic_partitions: int = env(
        "KEYCHAIN_TOPIC_PARTITIONS", default=8, ge=1, description="Partitions of topics the worker creates."
    )
    web_port: int = env(
        "KEYCHAIN_WEB_PORT", default=6066, ge=1, le=65535, description="HTTP port of the worker (health, metrics, admin)."
    )
    web_host: str = env("KEYCHAIN_WEB_HOST", default="0.0.0.0", description="Address the HTTP server binds.")
    admin_token: SecretStr | None = env(
        "KEYCHAIN_ADMIN_TOKEN",
        default=None,
        description="Bearer token for POST /invalidate; unset disables the endpoint.",
    )
    data_dir: str = env(
        "KEYCHAIN_DATA_DIR", default="/tmp/keychain-warmer", description="Faust's scratch directory (no state)."
    )
    broker_session_timeout_seconds: float = env(
        "KEYCHAIN_BROKER_SESSION_TIMEOUT_SECONDS", default=10.0, gt=0, description="Consumer group session timeout."
    )
    broker_heartbeat_interval_seconds: float = env(
        "KEYCHAIN_BROKER_HEARTBEAT_INTERVAL_SECONDS", default=1.0, gt=0, description="Consumer heartbeat interval."
    )
    consumer_fetch_max_wait_ms: int = env(
        "KEYCHAIN_CONSUMER_FETCH_MAX_WAIT_MS",
        default=100,
        ge=1,
        description="Longest a consumer fetch waits for records (faust's fixed 1500 ms delays events on brokers "
        "that hold fetches, such as the local tansu).",
    )
    warm_batch_size: int = env(
        "KEYCHAIN_WARM_BATCH_SIZE", default=500, ge=1, description="Most events handled (and written) at once."
    )
    warm_batch_seconds: float = env(
        "KEYCHAIN_WARM_BATCH_SECONDS", default=0.05, gt=0, description="Longest wait to fill a batch."
    )
    warm_concurrency: int = env(
        "KEYCHAIN_WARM_CONCURRENCY", default=32, ge=1, description="Secret Manager calls in flight per worker."
    )
    secret_manager_max_calls_per_minute: int = env(
        "SECRET_MANAGER_MAX_CALLS_PER_MINUTE",
        default=6000,
        ge=1,
        description="Access budget per worker (the project quota is 90,000 per minute).",
    )
    warm_fetch_window_seconds: float = env(
        "KEYCHAIN_WARM_FETCH_WINDOW_SECONDS",
        default=10.0,
        ge=0,
        description="A fetched version is reused for this long by later batches: one call per secret per burst.",
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
    max_playbook_bytes: int = env(
        "KEYCHAIN_MAX_PLAYBOOK_BYTES", default=1_048_576, ge=1, description="Larger catalog playbooks are refused."
    )
    catalog_dsn: str | None = env(
        "KEYCHAIN_CATALOG_DSN",
        default=None,
        description="DSN of NoETL's database, when its catalog is not in the keychain's database (read only).",
    )
    catalog_schema: str = env(
        "KEYCHAIN_CATALOG_SCHEMA",
        default="noetl",
        pattern=r"^[a-z_][a-z0-9_]{0,62}$",
        description="Schema of NoETL's `catalog` table, where start events that carry no playbook find it.",
    )
    catalog_cache_size: int = env(
        "KEYCHAIN_CATALOG_CACHE_SIZE", default=1000, ge=1, description="Parsed playbooks kept, by catalog id."
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
    reconcile_batch: int = env(
        "KEYCHAIN_RECONCILE_BATCH",
        default=50,
        ge=1,
        description="Secrets compared per reconciliation (reads; the project quota is 600 per minute).",
    )
    pubsub_max_messages: int = env(
        "KEYCHAIN_PUBSUB_MAX_MESSAGES",
        default=100,
        ge=1,
        description="Flow control: notifications held by the bridge at once.",
    )
    pubsub_ack_deadline_seconds: int = env(
        "KEYCHAIN_PUBSUB_ACK_DEADLINE_SECONDS",
        default=10,
        ge=10,
        le=600,
        description="Lease per notification; what a crashed bridge held is redelivered after it.",
    )

    # --- logging --------------------------------------------------------------------------------------------------
    log_level: str = env("KEYCHAIN_LOG_LEVEL", default="INFO", description="Python log level.")
    log_format: str = env(
        "KEYCHAIN_LOG_FORMAT", default="text", pattern="^(text|json)$", description="`text` or `json` log lines."
    )


def load_settings() -> Settings:
    """Settings from the environment; a bad value is a ConfigurationError naming the variable, never echoing it."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigurationError(f"bad configuration: {problems}") from None


@lru_cache(maxsize=1)
def settings_from_env() -> Settings:
    return load_settings()

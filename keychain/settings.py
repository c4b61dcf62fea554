"""Every setting of the keychain library, read from environment variables, with its default, in one place.

The stream worker's own settings extend these (`streams/settings.py`); a worker that only reads the keychain needs
nothing else. The environment variable names are the contract shared by the README, docker-compose.yml and deploy/.
A field name given in code that is not a setting is an error; `unknown_variables` names the KEYCHAIN_* variables of
an environment that are not settings (a typo is otherwise silent).
"""

from __future__ import annotations

import difflib
import importlib.metadata
import logging
import os
from typing import Mapping, TypeVar
from urllib.parse import parse_qs, urlsplit

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .errors import ConfigurationError

log = logging.getLogger("keychain")


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


def check_dsn(value: str) -> str:
    """A PostgreSQL URI asyncpg can use, checked before any connection so that a typo is one clear line at start.
    The errors never repeat the value (it may hold a password)."""
    try:
        parts = urlsplit(value)
        query = parse_qs(parts.query, keep_blank_values=True)
    except ValueError:
        raise ValueError("not a PostgreSQL URI (postgresql://user@host:port/database)") from None
    if parts.scheme not in ("postgres", "postgresql"):
        raise ValueError("not a PostgreSQL URI: it must start with postgresql://")
    hosts = parts.netloc.rpartition("@")[2]
    ports = [host.rpartition("]")[2].rpartition(":")[2] for host in hosts.split(",") if ":" in host.rpartition("]")[2]]
    ports += query.get("port", [])
    if any(not port.isdigit() or not 0 < int(port) < 65536 for port in ports):
        raise ValueError("its port is not a number from 1 to 65535")
    if any(mode not in SSL_MODES for mode in query.get("sslmode", [])):
        raise ValueError(f"its sslmode must be one of {', '.join(SSL_MODES)}")
    return value


def env(name: str, *, description: str, **kwargs):
    """A field read from exactly one environment variable (or from its field name when built in code)."""
    return Field(validation_alias=AliasChoices(name), description=description, **kwargs)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(populate_by_name=True, extra="forbid", frozen=True)

    # --- the keychain table -------------------------------------------------------------------------------------
    dsn: str = env(
        "KEYCHAIN_DSN",
        default="postgresql://postgres@127.0.0.1:5432/postgres",
        description="PostgreSQL DSN of the database that holds the keychain.",
    )
    schema_name: str = env(
        "KEYCHAIN_SCHEMA",
        default="keychain_warmer",
        pattern=r"^[a-z_][a-z0-9_]{0,62}$",
        description="Schema of this project's tables (its keychain, fences, shared fetches, copies): a schema of its "
        "own (`keychain migrate` refuses one holding another program's tables).",
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
        description="How long a fetch (a read-through, the warm) waits for another process that is fetching the same "
        "secret.",
    )
    read_flush_seconds: float = env(
        "KEYCHAIN_READ_FLUSH_SECONDS",
        default=1.0,
        gt=0,
        description="A hit is counted in memory; the counts (`accessed_at`, `access_count`) reach their rows this "
        "often, for every row read meanwhile in one statement.",
    )
    shared_fetch_seconds: float = env(
        "KEYCHAIN_SHARED_FETCH_SECONDS",
        default=10.0,
        ge=0,
        description="A fetched secret version is reused for this long, by this process (in memory, dropped when the "
        "window ends) and by every other (sealed, in the database): one Secret Manager call per version per burst "
        "across batches, replicas and readers (0: no reuse).",
    )
    secret_manager_max_calls_per_minute: int = env(
        "SECRET_MANAGER_MAX_CALLS_PER_MINUTE",
        default=6000,
        ge=0,
        description="Secret Manager access budget shared by every process on this keychain (worker replicas and "
        "read-throughs together; the project quota is 90,000 per minute); also the largest burst. 0: no budget.",
    )
    negative_ttl_seconds: int = env(
        "KEYCHAIN_NEGATIVE_TTL_SECONDS",
        default=60,
        gt=0,
        description="How long a NOT_FOUND / PERMISSION_DENIED answer is remembered before asking again.",
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
    secret_manager_retry_initial_seconds: float = env(
        "SECRET_MANAGER_RETRY_INITIAL_SECONDS", default=0.2, gt=0, description="First retry backoff."
    )
    secret_manager_retry_max_seconds: float = env(
        "SECRET_MANAGER_RETRY_MAX_SECONDS", default=5.0, gt=0, description="Largest retry backoff."
    )

    # --- logging --------------------------------------------------------------------------------------------------
    log_level: str = env(
        "KEYCHAIN_LOG_LEVEL", default="INFO",
        description="Log level: DEBUG, INFO, WARNING, ERROR or CRITICAL (any case).",
    )
    log_secret_ids: bool = env(
        "KEYCHAIN_LOG_SECRET_IDS", default=True,
        description="Name secrets in INFO log lines (a rotation's invalidation, a notice); `false`: a short stable "
        "fingerprint instead (secret names can tell what a system holds). Values are never logged.",
    )
    log_format: str = env(
        "KEYCHAIN_LOG_FORMAT", default="text", pattern="^(text|json)$", description="`text` or `json` log lines."
    )

    @field_validator("dsn")
    @classmethod
    def _dsn(cls, value: str) -> str:
        return check_dsn(value)

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        if value.upper() not in LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(LOG_LEVELS)} (any case)")
        return value.upper()


S = TypeVar("S", bound=Settings)


def variable_names(settings_class: type[Settings] = Settings) -> set[str]:
    return {field.validation_alias.choices[0] for field in settings_class.model_fields.values()}


def extension_variable_names() -> set[str]:
    """The variables of every settings class that extends the library's and registered itself under the
    `keychain.settings` entry point group (the stream worker's does): in an environment they share (one ConfigMap),
    the worker's variables are not typos of the library's."""
    names: set[str] = set()
    for entry in importlib.metadata.entry_points(group="keychain.settings"):
        try:
            extension = entry.load()
        except Exception as exc:  # an extension that cannot load names nothing
            log.debug("settings extension %s not loaded: %s", entry.name, type(exc).__name__)
            continue
        if isinstance(extension, type) and issubclass(extension, Settings):
            names |= variable_names(extension)
    return names


def unknown_variables(environ: Mapping[str, str], settings_class: type[Settings] = Settings,
                      also_known: set[str] = frozenset()) -> list[str]:
    """One message for each KEYCHAIN_* variable that is neither a setting nor in `also_known`, with the closest
    setting's name."""
    known = variable_names(settings_class)
    suffixes = sorted(n.removeprefix("KEYCHAIN_") for n in known if n.startswith("KEYCHAIN_"))  # the prefix is shared
    messages = []
    for name in sorted(n for n in environ if n.startswith("KEYCHAIN_") and n not in known | also_known):
        close = difflib.get_close_matches(name.removeprefix("KEYCHAIN_"), suffixes, n=1)
        messages.append(f"{name} is not a setting" + (f" (did you mean KEYCHAIN_{close[0]}?)" if close else ""))
    return messages


def load_settings(settings_class: type[S] = Settings, *, warn_unknown: bool = False) -> S:  # type: ignore[assignment]
    """Settings from the environment; a bad value is a ConfigurationError naming the variable, never echoing it.
    With `warn_unknown` (a process's start), every KEYCHAIN_* variable that is not a setting is logged once."""
    if warn_unknown:
        for message in unknown_variables(os.environ, settings_class):
            log.warning("%s", message)
    try:
        return settings_class()
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg'].removeprefix('Value error, ')}"
            for err in exc.errors()
        )
        raise ConfigurationError(f"bad configuration: {problems}") from None

"""Typed errors. Messages name credentials and references, never a secret value."""

from __future__ import annotations

import asyncpg


class KeychainError(Exception):
    """Base class of every error the keychain raises on purpose."""


class KeychainUnavailable(KeychainError):
    """The keychain's database cannot be reached (down, restarting, refusing connections). Retry later; a worker's
    `get_or_fetch` serves straight from Secret Manager meanwhile."""


class KeychainConflict(KeychainError):
    """A write kept being rolled back by PostgreSQL for a concurrent transaction (a deadlock or a serialization
    failure) after the library's own retries (keychain_database_retries_total). Nothing was written; every write is
    idempotent, so the caller may run it again."""


class KeychainDatabaseError(KeychainError):
    """The database refused an operation for another reason than an outage or a conflict (a missing table, a
    privilege, a constraint, a trigger). The message names the error's class and SQLSTATE only."""


class InvalidArgument(KeychainError, ValueError):
    """An argument the keychain cannot take (a scope without its id, an unknown scope, two invalidation targets)."""


class ConfigurationError(KeychainError):
    """A setting is missing or malformed (bad DSN, bad key ring, ...)."""


class DecryptionError(KeychainError):
    """A row could not be decrypted: tampered, moved to another row, or encrypted under an unknown key."""


class InvalidReference(KeychainError, ValueError):
    """A string is not a Secret Manager secret or version name."""


class SecretSourceError(KeychainError):
    """Secret Manager did not give the value. `code` is a stable short name fit for metrics and the table."""

    code = "ERROR"
    permanent = False

    def __init__(self, reference: str, detail: str = ""):
        self.reference = reference
        self.detail = detail
        super().__init__(f"{self.code}: {reference}" + (f" ({detail})" if detail else ""))


class SecretNotFound(SecretSourceError):
    code = "NOT_FOUND"
    permanent = True


class SecretPermissionDenied(SecretSourceError):
    code = "PERMISSION_DENIED"
    permanent = True


class SecretVersionDisabled(SecretSourceError):
    """The version exists but is disabled or destroyed (FAILED_PRECONDITION)."""

    code = "FAILED_PRECONDITION"
    permanent = True


class SecretUnavailable(SecretSourceError):
    """UNAVAILABLE or DEADLINE_EXCEEDED after every retry."""

    code = "UNAVAILABLE"


class ChecksumMismatch(SecretSourceError):
    """The payload did not match its CRC32C: corrupted in transit."""

    code = "DATA_LOSS"


PERMANENT_ERRORS: dict[str, type[SecretSourceError]] = {
    cls.code: cls for cls in (SecretNotFound, SecretPermissionDenied, SecretVersionDisabled)
}


class CachedFailure(KeychainError):
    """The keychain remembers that Secret Manager refused this credential recently (negative cache)."""

    def __init__(self, credential_name: str, code: str):
        self.credential_name = credential_name
        self.code = code
        super().__init__(f"{credential_name}: Secret Manager answered {code}; remembered, not asked again yet")


# A database that is down, restarting or refusing connections (as the driver reports it).
CONNECTION_ERRORS = (OSError, ConnectionError, TimeoutError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
                     asyncpg.exceptions.OperatorInterventionError,  # admin/crash shutdown, cannot connect now
                     asyncpg.InternalClientError)  # a connection lost in the middle of an operation

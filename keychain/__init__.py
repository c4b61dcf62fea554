"""keychain: the encrypted, scoped credential cache that workflow workers read (`KEYCHAIN_SCHEMA`.keychain)."""

from .errors import (
    CachedFailure,
    ConfigurationError,
    DecryptionError,
    KeychainError,
    KeychainUnavailable,
    SecretNotFound,
    SecretPermissionDenied,
    SecretSourceError,
    SecretUnavailable,
    SecretVersionDisabled,
)
from .invalidation import Selection
from .model import Entry, Lookup, Provenance, Scope
from .refs import SecretRef
from .settings import Settings
from .sources import SecretManagerSource
from .store import Keychain

__all__ = [
    "CachedFailure", "ConfigurationError", "DecryptionError", "Entry", "Keychain", "KeychainError",
    "KeychainUnavailable", "Lookup",
    "Provenance", "Scope", "SecretManagerSource", "Selection", "SecretNotFound", "SecretPermissionDenied", "SecretRef",
    "SecretSourceError", "SecretUnavailable", "SecretVersionDisabled", "Settings",
]

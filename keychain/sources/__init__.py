"""Where secret values come from when the keychain does not hold them."""

from .secret_manager import SecretManagerSource, SecretValue

__all__ = ["SecretManagerSource", "SecretValue"]

"""Secret Manager references: `projects/P/secrets/S[/versions/V]`.

A reference is *pinned* when V is a version number; it *floats* when V is `latest`, an alias, or absent (= latest).
Floating entries go stale when a version is added; pinned ones only when their own version is disabled or destroyed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

from .errors import InvalidReference

_REF = re.compile(
    r"^projects/(?P<project>[a-z0-9][a-z0-9.:-]{0,62})"
    r"/secrets/(?P<secret>[A-Za-z0-9_-]{1,255})"
    r"(?:/versions/(?P<version>[1-9][0-9]{0,18}|latest|[A-Za-z][A-Za-z0-9_-]{0,62}))?$"
)


@dataclass(frozen=True, slots=True)
class SecretRef:
    project: str
    secret: str
    version: str = "latest"
    # Its full name, made once: a burst renders, compares and stores the same few references thousands of times.
    version_name: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "version_name", f"projects/{self.project}/secrets/{self.secret}/versions/{self.version}")

    def __hash__(self) -> int:
        return hash(self.version_name)

    @classmethod
    def parse(cls, text: str) -> "SecretRef":
        if not isinstance(text, str):
            raise _invalid("<reference>")
        return _parse(text)

    @property
    def secret_name(self) -> str:
        return f"projects/{self.project}/secrets/{self.secret}"

    @property
    def pinned(self) -> bool:
        return self.version.isdigit()

    def with_version(self, version: str) -> "SecretRef":
        return SecretRef(self.project, self.secret, version)

    def __str__(self) -> str:
        return self.version_name


@lru_cache(maxsize=4096)
def _parse(text: str) -> SecretRef:
    """A burst parses the same few references thousands of times (a reference is immutable, so shared)."""
    match = _REF.match(text.strip())
    if match is None:
        raise _invalid(text if len(text) <= 200 else "<reference>")
    return SecretRef(match["project"], match["secret"], match["version"] or "latest")


def _invalid(shown: str) -> InvalidReference:
    return InvalidReference(f"not a Secret Manager reference: {shown!r} "
                            "(expected projects/P/secrets/S or projects/P/secrets/S/versions/N|latest|ALIAS)")

"""Secret Manager references: `projects/P/secrets/S[/versions/V]`, and regional secrets
`projects/P/locations/L/secrets/S[/versions/V]` (served by the regional endpoint `secretmanager.L.rep.googleapis.com`).

A reference is *pinned* when V is a version number; it *floats* when V is `latest`, an alias, or absent (= latest).
Floating entries go stale when a version is added; pinned ones only when their own version is disabled or destroyed.
An alias follows Google's rule: a letter first, at most 63 letters, digits, `-` and `_`; `latest` in any case is
`latest`, and `new` in any case is reserved (not an alias).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

from .errors import InvalidReference

_REF = re.compile(
    r"^projects/(?P<project>[a-z0-9][a-z0-9.:-]{0,62})"
    r"(?:/locations/(?P<location>[a-z][a-z0-9-]{0,62}))?"
    r"/secrets/(?P<secret>[A-Za-z0-9_-]{1,255})"
    r"(?:/versions/(?P<version>[1-9][0-9]{0,18}|[A-Za-z][A-Za-z0-9_-]{0,62}))?$"
)
_RESERVED_VERSIONS = frozenset({"new"})  # any case: not an alias
# In a row's `sources` names: Secret Manager did not say which project number the reference's project is (it refused
# the fetch), so every invalidation of the secret's id reaches the row, whichever project it names.
UNKNOWN_PROJECT = "*"


@dataclass(frozen=True, slots=True)
class SecretRef:
    project: str
    secret: str
    version: str = "latest"
    location: str | None = None  # a regional secret's location; None: a global secret
    # Its full name, made once: a burst renders, compares and stores the same few references thousands of times.
    version_name: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "version_name", f"{self.secret_name}/versions/{self.version}")

    def __hash__(self) -> int:
        return hash(self.version_name)

    @classmethod
    def parse(cls, text: str) -> "SecretRef":
        if not isinstance(text, str):
            raise _invalid("<reference>")
        return _parse(text)

    @property
    def secret_name(self) -> str:
        where = f"/locations/{self.location}" if self.location else ""
        return f"projects/{self.project}{where}/secrets/{self.secret}"

    @property
    def secret_id(self) -> str:
        """The secret's id where the keychain keeps track of it (generations, notices, fences): `S`, or `L/S` for a
        regional secret (the global secret `S` and `S` in each location are different secrets)."""
        return f"{self.location}/{self.secret}" if self.location else self.secret

    @property
    def pinned(self) -> bool:
        return self.version.isdigit()

    def with_version(self, version: str) -> "SecretRef":
        return SecretRef(self.project, self.secret, version, self.location)

    def __str__(self) -> str:
        return self.version_name


@lru_cache(maxsize=4096)
def _parse(text: str) -> SecretRef:
    """A burst parses the same few references thousands of times (a reference is immutable, so shared)."""
    match = _REF.match(text.strip())
    version = (match["version"] or "latest") if match else ""
    if version.lower() == "latest":
        version = "latest"
    if match is None or version.lower() in _RESERVED_VERSIONS:
        raise _invalid(text if len(text) <= 200 else "<reference>")
    return SecretRef(match["project"], match["secret"], version, match["location"])


def _invalid(shown: str) -> InvalidReference:
    return InvalidReference(f"not a Secret Manager reference: {shown!r} "
                            "(expected projects/P/secrets/S or projects/P/secrets/S/versions/N|latest|ALIAS; "
                            "regional: projects/P/locations/L/secrets/S...)")

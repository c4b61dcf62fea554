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
# A secret's project when its number is not known yet: the reference names it by id and Secret Manager has not
# answered for it (SecretIdentity).
UNKNOWN_PROJECT = "*"
_KEY = re.compile(r"^projects/(?P<project>[0-9]{1,30}|\*)(?:/locations/(?P<location>[a-z][a-z0-9-]{0,62}))?"
                  r"/secrets/(?P<secret>[A-Za-z0-9_-]{1,255})$")


@dataclass(frozen=True, slots=True)
class SecretIdentity:
    """THE identity of a secret, wherever the keychain keeps track of one (rotation generations and fences, the shared
    fetches, the reconciliation summary, refusals, the `secret` of every `sources` element, Kafka keys, comparisons):
    its project as Secret Manager answers it, by NUMBER, its location (None: global) and its id. Its `key` is the
    secret's name as Secret Manager answers it: `projects/NUMBER[/locations/L]/secrets/S`.

    A reference may name its project by id (`projects/prod-1/...`), which cannot be told from another project's
    number. Until Secret Manager has answered once for that project (every name it answers has the number: the
    mapping is then learned for good, keychain/projects.py), the project is UNKNOWN_PROJECT: never a guess, and never
    merged with a known project. An invalidation of `projects/N/.../S` also reaches what is held of S under an unknown
    project (it may be N), never what is held of S in another known project."""

    project: str  # a project number, or UNKNOWN_PROJECT
    secret: str
    location: str | None = None
    key: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        where = f"/locations/{self.location}" if self.location else ""
        object.__setattr__(self, "key", f"projects/{self.project}{where}/secrets/{self.secret}")

    def __hash__(self) -> int:
        return hash(self.key)

    @classmethod
    def from_key(cls, key: str) -> "SecretIdentity":
        match = _KEY.match(key) if isinstance(key, str) else None
        if match is None:
            raise InvalidReference(f"not a secret's identity: {key[:200]!r}" if isinstance(key, str)
                                   else "not a secret's identity")
        return cls(match["project"], match["secret"], match["location"])

    @property
    def known(self) -> bool:
        """Whether its project's number is known."""
        return self.project != UNKNOWN_PROJECT

    @property
    def path(self) -> str:
        """The key without its project (`secrets/S`, `locations/L/secrets/S`): what every project's S has in common."""
        return self.key.split("/", 2)[2]

    @property
    def unknown_project(self) -> "SecretIdentity":
        """The same secret id and location under a project not known yet."""
        return SecretIdentity(UNKNOWN_PROJECT, self.secret, self.location)

    @property
    def reached_keys(self) -> list[str]:
        """The identity keys an invalidation of this secret reaches (generations, shared fetches, refusals, summary):
        its own, and the same id and location under a project not known yet (it may be this one)."""
        return sorted({self.key, self.unknown_project.key})

    @property
    def secret_id(self) -> str:
        """The secret's short id (`S`, or `L/S`): shared by every project's secret of that id. Never a key; only what an
        invalidation that cannot tell the project (an operator naming an unknown project id) reaches."""
        return f"{self.location}/{self.secret}" if self.location else self.secret

    def __str__(self) -> str:
        return self.key


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
        """The secret's short id, `S` or `L/S`, shared by every project's secret of that id: never an identity (that is
        `identity()`)."""
        return f"{self.location}/{self.secret}" if self.location else self.secret

    @property
    def pinned(self) -> bool:
        return self.version.isdigit()

    def identity(self, project_number: str | None = None) -> SecretIdentity:
        """The secret's identity: its project's number as written, or as learned (`project_number`), else unknown."""
        number = self.project if self.project.isdigit() else project_number
        return SecretIdentity(number or UNKNOWN_PROJECT, self.secret, self.location)

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

"""Secret Manager references: `projects/P/secrets/S[/versions/V]`.

A reference is *pinned* when V is a version number; it *floats* when V is `latest`, an alias, or absent (= latest).
Floating entries go stale when a version is added; pinned ones only when their own version is disabled or destroyed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

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

    @classmethod
    def parse(cls, text: str) -> "SecretRef":
        match = _REF.match(text.strip()) if isinstance(text, str) else None
        if match is None:
            shown = text if isinstance(text, str) and len(text) <= 200 else "<reference>"
            raise InvalidReference(
                f"not a Secret Manager reference: {shown!r} "
                "(expected projects/P/secrets/S or projects/P/secrets/S/versions/N|latest|ALIAS)"
            )
        return cls(match["project"], match["secret"], match["version"] or "latest")

    @property
    def secret_name(self) -> str:
        return f"projects/{self.project}/secrets/{self.secret}"

    @property
    def version_name(self) -> str:
        return f"{self.secret_name}/versions/{self.version}"

    @property
    def pinned(self) -> bool:
        return self.version.isdigit()

    def with_version(self, version: str) -> "SecretRef":
        return SecretRef(self.project, self.secret, version)

    def __str__(self) -> str:
        return self.version_name

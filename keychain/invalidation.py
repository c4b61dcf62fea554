"""What an invalidation selects: one value, whichever door it came through (a rotation notice, the operator's HTTP
endpoint or CLI, reconciliation), so that every door takes the same one path (Maintenance.invalidate, and in the
worker every target beside it)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import InvalidArgument
from .refs import UNKNOWN_PROJECT, SecretRef

Kind = Literal["secret", "credential", "execution", "everything"]  # a closed set


@dataclass(frozen=True)
class Selection:
    """Entries to stop serving: those holding a secret (`secret_id`, narrowed by `match`: a `sources` element
    pattern such as {"version": "3"} or {"pinned": False}; and by `secret_name` when the door named the secret's
    project), those of a credential name, of an execution, or all."""

    kind: Kind
    secret_id: str | None = None
    match: dict[str, Any] = field(default_factory=dict, hash=False)
    credential: str | None = None
    execution_id: int | None = None
    # A version just added (a SECRET_VERSION_ADD notice): a copy that already holds it, or a newer one, is current.
    added_version: str | None = None
    # projects/P[/locations/L]/secrets/S as a notice or the operator named it. With P a project NUMBER (as notices
    # name it) only rows whose value came from that project's secret are reached: their `names` hold the name as
    # Secret Manager answered it, which is by number; and rows whose project number was never told (a refusal: "*"
    # in their names). A project id cannot be told from another project's number, so it narrows nothing.
    secret_name: str | None = None

    @classmethod
    def of(cls, *, credential: str | None = None, execution_id: int | None = None,
           secret: str | SecretRef | None = None, version: str | None = None, everything: bool = False
           ) -> "Selection":
        """Exactly one of: a credential name, an execution id, a secret (every version of it; or the one version
        `version` names, or a pinned reference names), everything."""
        chosen = [x for x in (credential, execution_id, secret) if x is not None] + ([True] if everything else [])
        if len(chosen) != 1:
            raise InvalidArgument("invalidate exactly one of: credential, execution_id, secret, everything")
        if secret is not None:
            ref = secret if isinstance(secret, SecretRef) else SecretRef.parse(secret)
            version = version or (ref.version if ref.pinned else None)
            return cls.matching(ref.secret_id, {"version": version} if version else {}, secret_name=ref.secret_name)
        if credential is not None:
            return cls("credential", credential=credential)
        if execution_id is not None:
            if isinstance(execution_id, bool) or not isinstance(execution_id, int):
                raise InvalidArgument("execution id must be an integer")
            return cls("execution", execution_id=execution_id)
        return cls("everything")

    @classmethod
    def matching(cls, secret_id: str, match: dict[str, Any], *, added_version: str | None = None,
                 secret_name: str | None = None) -> "Selection":
        """The rows of one secret whose `sources` element also contains `match` (a rotation notice's rule)."""
        return cls("secret", secret_id=secret_id, match=dict(match), added_version=added_version,
                   secret_name=secret_name)

    def patterns(self, match: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """For a secret selection: the `sources` element patterns (any of them) of the rows it reaches, with `match`
        (default: the selection's own)."""
        base = {"secret_id": self.secret_id, **(self.match if match is None else match)}
        if self.secret_name is None or not SecretRef.parse(self.secret_name).project.isdigit():
            return [base]
        return [{**base, "names": [self.secret_name]}, {**base, "names": [UNKNOWN_PROJECT]}]

    @property
    def sources_patterns(self) -> list[str]:
        """`patterns()` as `sources` containment arguments (`sources @> ANY($1::jsonb[])`)."""
        return [json.dumps([pattern]) for pattern in self.patterns()]

    def describe(self) -> str:
        """For logs: the kind and what it names (a secret's short id, never a value)."""
        detail = {"secret": self.secret_id, "credential": self.credential, "execution": self.execution_id}.get(self.kind)
        return self.kind if detail is None else f"{self.kind} {detail}"

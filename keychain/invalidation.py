"""What an invalidation selects: one value, whichever door it came through (a rotation notice, the operator's HTTP
endpoint or CLI, reconciliation), so that every door takes the same one path (Maintenance.invalidate, and in the
worker every target beside it)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from .errors import InvalidArgument
from .refs import SecretIdentity, SecretRef

Kind = Literal["secret", "credential", "execution", "everything"]  # a closed set


@dataclass(frozen=True)
class Selection:
    """Entries to stop serving: those holding a secret (`secret`, its identity; narrowed by `match`, a `sources`
    element pattern such as {"version": "3"} or {"pinned": False}), those of a credential name, of an execution, or
    all.

    A secret selection reaches the rows whose values came from that secret (their `sources` element's `secret` is its
    identity) and the rows of the same secret id and location held under a project not known yet (a refusal of a
    reference by project id: it may be this project). With `any_project` (a person named the project by an id whose
    number nobody has learned: it cannot be told from any project's number) it reaches that secret id and location
    in every project: more than needed, never less."""

    kind: Kind
    secret: SecretIdentity | None = None
    match: dict[str, Any] = field(default_factory=dict, hash=False)
    credential: str | None = None
    execution_id: int | None = None
    # A version just added (a SECRET_VERSION_ADD notice): a copy that already holds it, or a newer one, is current.
    added_version: str | None = None
    any_project: bool = False
    # The secret as a person named it, when its project is an id: Maintenance.invalidate resolves it (resolved()).
    named: SecretRef | None = field(default=None, compare=False)

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
            return cls.named_secret(ref, {"version": version} if version else {})
        if credential is not None:
            return cls("credential", credential=credential)
        if execution_id is not None:
            if isinstance(execution_id, bool) or not isinstance(execution_id, int):
                raise InvalidArgument("execution id must be an integer")
            return cls("execution", execution_id=execution_id)
        return cls("everything")

    @classmethod
    def matching(cls, secret: SecretIdentity, match: dict[str, Any], *, added_version: str | None = None
                 ) -> "Selection":
        """The rows of one secret whose `sources` element also contains `match` (a rotation notice's rule)."""
        return cls("secret", secret=secret, match=dict(match), added_version=added_version)

    @classmethod
    def named_secret(cls, ref: SecretRef, match: dict[str, Any], *, added_version: str | None = None) -> "Selection":
        """The rows of the secret a reference names (its project by number, or by an id resolved later)."""
        selection = cls.matching(ref.identity(), match, added_version=added_version)
        return selection if ref.project.isdigit() else replace(selection, named=ref)

    def resolved(self, number: str | None) -> "Selection":
        """A selection naming its project by id, with that project's number (learned), or for every project (None)."""
        if self.named is None:
            return self
        if number is None:
            return replace(self, any_project=True, named=None)
        return replace(self, secret=self.named.identity(number), named=None)

    @property
    def secrets(self) -> list[str]:
        """For a secret selection: the identity keys whose generations, shared fetches, refusals and summary it
        reaches (beside every project's, with `any_project`)."""
        return self.secret.reached_keys if self.secret is not None else []

    @property
    def any_project_path(self) -> str | None:
        """With `any_project`: the secret's path, which every project's secret of that id and location has."""
        return self.secret.path if self.any_project and self.secret is not None else None

    def patterns(self, match: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """For a secret selection: the `sources` element patterns (any of them) of the rows it reaches, with `match`
        (default: the selection's own)."""
        rule = self.match if match is None else match
        if self.any_project:
            return [{"secret_id": self.secret.secret_id, **rule}]
        return [{"secret": key, **rule} for key in self.secrets]

    @property
    def sources_patterns(self) -> list[str]:
        """`patterns()` as `sources` containment arguments (`sources @> ANY($1::jsonb[])`)."""
        return [json.dumps([pattern]) for pattern in self.patterns()]

    def as_json(self) -> dict[str, Any]:
        """The selection as JSON (an outbox entry's work), resolved: a project named by id is resolved first."""
        if self.named is not None:
            raise ValueError("resolve the selection's project first")
        return {"kind": self.kind, "secret": self.secret.key if self.secret else None, "match": self.match,
                "credential": self.credential, "execution_id": self.execution_id,
                "added_version": self.added_version, "any_project": self.any_project}

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> "Selection":
        secret = document.get("secret")
        return cls(document["kind"], SecretIdentity.from_key(secret) if secret else None, dict(document["match"]),
                   document.get("credential"), document.get("execution_id"), document.get("added_version"),
                   bool(document.get("any_project")))

    @property
    def ordering(self) -> str:
        """What the selection's work must stay in order with (an outbox entry's ordering): a secret's invalidations
        one after the other, and so a credential's, an execution's, everything's."""
        if self.kind == "secret":
            return f"secret:{self.secret.path if self.any_project else self.secret.key}"
        detail = {"credential": self.credential, "execution": self.execution_id}.get(self.kind)
        return self.kind if detail is None else f"{self.kind}:{detail}"

    def describe(self) -> str:
        """For logs: the kind and what it names (a secret's identity, never a value)."""
        detail = {"secret": self.secret.key if self.secret else None, "credential": self.credential,
                  "execution": self.execution_id}.get(self.kind)
        return self.kind if detail is None else f"{self.kind} {detail}"

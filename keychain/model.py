"""The values the keychain API takes and returns."""

from __future__ import annotations

import base64
import functools
import json
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from .errors import InvalidArgument
from .refs import SecretIdentity, SecretRef

ScopeType = Literal["execution", "global", "session"]
Outcome = Literal["hit", "miss", "expired", "stale", "failed", "other_source", "direct"]


# Compact JSON, with one encoder made once (json.dumps with arguments builds a new one per call).
compact_json = json.JSONEncoder(separators=(",", ":")).encode

MAX_NAME_BYTES = 1024  # a keychain name is part of a unique index: PostgreSQL's btree takes about 2,700 bytes a row


def storable_text(value: str, max_bytes: int = MAX_NAME_BYTES) -> str:
    """Text PostgreSQL can store and index: no NUL, no lone surrogate, at most `max_bytes` of UTF-8."""
    if "\x00" in value:
        raise ValueError("must not contain NUL")
    try:
        size = len(value.encode())
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode (no lone surrogates)") from None
    if size > max_bytes:
        raise ValueError(f"must be at most {max_bytes} bytes")
    return value


class RowIdentity(NamedTuple):
    """The table's key: one row per credential name and scope. Its associated data binds a ciphertext to it. (A
    named tuple: a burst makes several per row, and a tuple is made and hashed several times faster than a frozen
    dataclass.)"""

    credential_name: str
    scope_type: str
    scope_id: str

    def associated_data(self, key_id: str, write_id: int | None = None) -> bytes:
        bound = [] if write_id is None else [write_id]
        return compact_json(
            ["keychain/v1" if write_id is None else "keychain/v2", self.credential_name, self.scope_type,
             self.scope_id, key_id, *bound]
        ).encode()


class RowToWrite(NamedTuple):
    """One row for the `put_entries` statement, its columns in the statement's order ($1 ... $13)."""

    credential_name: str
    credential_type: str
    scope_type: str
    cache_type: str
    execution_id: int | None
    session_id: str | None
    state: str
    error_code: str | None
    key_id: str | None
    data: bytes | None
    write_id: int | None
    sources: str
    ttl_seconds: int


_SCOPE_NEEDS = {"execution": "an execution id", "session": "a session id",
                "global": "neither an execution nor a session id"}


@dataclass(frozen=True, slots=True)
class Scope:
    """Who may read an entry: one execution, one session, or everyone (global)."""

    type: ScopeType
    execution_id: int | None = None
    session_id: str | None = None

    @classmethod
    def of(
        cls, *, execution_id: int | None = None, session_id: str | None = None, scope: str | None = None
    ) -> "Scope":
        """Scope from keyword arguments: an execution id means execution scope, a session id session scope."""
        if execution_id is not None and session_id is not None:
            raise InvalidArgument("give an execution id or a session id, not both")
        inferred = "execution" if execution_id is not None else "session" if session_id is not None else "global"
        chosen = scope or inferred
        if chosen not in _SCOPE_NEEDS:
            raise InvalidArgument(f"unknown scope {str(chosen)[:40]!r}: execution, session or global")
        if chosen != inferred:
            raise InvalidArgument(f"scope {chosen!r} needs {_SCOPE_NEEDS[chosen]}")
        if execution_id is not None and not isinstance(execution_id, int):
            raise InvalidArgument("execution id must be an integer")
        return cls(chosen, execution_id, session_id)  # type: ignore[arg-type]

    @property
    def scope_id(self) -> str:
        if self.type == "execution":
            return str(self.execution_id)
        if self.type == "session":
            return self.session_id or ""
        return ""

    def identity(self, credential_name: str) -> RowIdentity:
        if self.type == "execution":
            return RowIdentity(credential_name, "execution", str(self.execution_id))
        return RowIdentity(credential_name, self.type, self.session_id or "" if self.type == "session" else "")


@dataclass(frozen=True, slots=True)
class Provenance:
    """Which Secret Manager version a stored value came from; rotation finds and fences rows through it."""

    ref: SecretRef  # as the playbook wrote it
    resolved_name: str | None  # as Secret Manager answered: projects/NUMBER/secrets/S/versions/N (None: refused)
    field: str | None = None  # the value's field it fills, for a keychain entry that maps several secrets

    @property
    def identity(self) -> SecretIdentity:
        """The secret's identity: as Secret Manager answered its name (the project by number), else as referenced
        (a project written by id and refused: unknown, which every invalidation of the secret's id and location in
        a known project reaches too)."""
        resolved = SecretRef.parse(self.resolved_name) if self.resolved_name else None
        if resolved is not None and resolved.project.isdigit():
            return resolved.identity()
        return self.ref.identity()

    def as_json(self) -> dict[str, Any]:
        resolved = SecretRef.parse(self.resolved_name) if self.resolved_name else None
        # `secret`: the identity every invalidation, fence and comparison goes by. `names`: the secret's name as
        # referenced and as answered (by project number): the spellings a reader's reference may match it by.
        told = [resolved.secret_name] if resolved and resolved.project.isdigit() else []
        document: dict[str, Any] = {
            "ref": str(self.ref),
            "secret": self.identity.key,
            "secret_id": self.ref.secret_id,
            "names": list(dict.fromkeys([self.ref.secret_name, *told])),
            "pinned": self.ref.pinned,
            "alias": not self.ref.pinned and self.ref.version != "latest",
        }
        if resolved is not None:
            document["version"] = resolved.version
        if self.field is not None:
            document["field"] = self.field
        return document


@dataclass(frozen=True)
class Entry:
    """One row to write. With `error_code` it records a refusal (readers get CachedFailure) instead of a value."""

    credential_name: str
    scope: Scope
    value: Any = field(default=None, repr=False)
    sources: tuple[Provenance, ...] = ()
    ttl_seconds: int | None = None
    cache_type: str = "secret"
    credential_type: str = "secret_manager"
    error_code: str | None = None
    # Rotation fence: (the identity key a value was fenced on, its generation read before the value was fetched), one
    # pair per value fetched (two references of one secret, each read at its own moment, are two pairs).
    fences: tuple[tuple[str, int], ...] = ()

    @functools.cached_property
    def identity(self) -> RowIdentity:
        """Its row (made once: a write asks for it several times)."""
        return self.scope.identity(self.credential_name)


@dataclass(frozen=True)
class Lookup:
    """The answer to a read. True when it has a value: a hit, or `direct` (read straight from Secret Manager while
    the keychain's database could not be reached)."""

    outcome: Outcome
    value: Any = field(default=None, repr=False)
    error_code: str | None = None

    def __bool__(self) -> bool:
        return self.outcome in ("hit", "direct")


def value_from_payload(payload: bytes) -> Any:
    """A Secret Manager payload as a JSON value: text when it is UTF-8, else {"base64": ...}."""
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(payload).decode()}


def held_token(field: str | None, identity: SecretIdentity, version: str) -> str:
    """What one value of a row is: the map field it fills, its secret's identity and the version as referenced
    (`latest`, an alias, a number). Two rows hold the same values when their tokens are the same set."""
    return f"{field or ''}={identity.key}/versions/{version}"


def held_of(sources: str | list[dict[str, Any]]) -> frozenset[str]:
    """The tokens of a row's (or a copy's) `sources` column."""
    elements = json.loads(sources) if isinstance(sources, str) else sources
    tokens = set()
    for element in elements:
        ref = SecretRef.parse(element["ref"])
        identity = SecretIdentity.from_key(element["secret"]) if "secret" in element else ref.identity()
        tokens.add(held_token(element.get("field"), identity, ref.version))
    return frozenset(tokens)


def sources_json(sources: tuple[Provenance, ...]) -> str:
    return "[" + ",".join(_provenance_json(p) for p in sources) + "]"


@functools.lru_cache(maxsize=4096)
def _provenance_json(provenance: Provenance) -> str:
    """A burst writes the same few provenances thousands of times."""
    return compact_json(provenance.as_json())

"""Which secrets a start event names, and under which keychain name and scope each is stored.

- a `credentials` entry without `name`, and a step's `auth` entry with `provider: secret_manager`: stored under
  the rendered reference (as the seed does), value = the secret's text;
- a `credentials` entry with `name`: under that name, value = the secret's text;
- a playbook `keychain:` entry with `kind: secret_manager`: under its name, value = {field: text} for its `map`.
Templates `{{ workload.x }}` render from the playbook's workload overridden by the event's, in a Jinja sandbox.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterator

from jinja2 import StrictUndefined
from jinja2.exceptions import SecurityError
from jinja2.sandbox import SandboxedEnvironment

from keychain.errors import InvalidReference
from keychain.model import Scope
from keychain.refs import SecretRef

from .events import BadEvent, ExecutionEvent

MAX_RENDERED = 2048  # a secret reference is short; anything longer is not one


class _Sandbox(SandboxedEnvironment):
    """Jinja's sandbox, which also refuses `*` and `**` that would build huge values (`{{ 'x' * 10**9 }}`)."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context, operator, left, right):
        if operator == "**" and isinstance(right, (int, float)) and abs(right) > 64:
            raise SecurityError("exponent too large")
        if operator == "*" and any(isinstance(x, (str, list, tuple)) for x in (left, right)):
            count = right if isinstance(right, int) else left if isinstance(left, int) else 0
            if count > MAX_RENDERED:
                raise SecurityError("repetition too large")
        return super().call_binop(context, operator, left, right)


_jinja = _Sandbox(undefined=StrictUndefined, autoescape=False)


@dataclass(frozen=True)
class Want:
    """One keychain row an execution needs: single-valued (`field` None) or a map of fields to references."""

    credential_name: str
    scope: Scope
    fields: tuple[tuple[str | None, SecretRef], ...]

    @property
    def refs(self) -> list[SecretRef]:
        return [ref for _, ref in self.fields]

    @classmethod
    def from_sources(cls, credential_name: str, scope: Scope, sources: str) -> "Want":
        """What to fetch again for an existing row, from its `sources` column (re-warm, keep-warm)."""
        return cls(credential_name, scope,
                   tuple((s.get("field"), SecretRef.parse(s["ref"])) for s in json.loads(sources)))


def resolve(event: ExecutionEvent) -> list[Want]:
    playbook = event.playbook if isinstance(event.playbook, dict) else {}
    workload = {**_mapping(playbook.get("workload")), **event.workload}
    context = {"workload": workload, "execution_id": event.execution_id}
    execution = Scope.of(execution_id=event.execution_id)
    wants: dict[tuple[str, str], Want] = {}

    def add(name: str, scope: Scope, fields: tuple[tuple[str | None, SecretRef], ...]) -> None:
        wants.setdefault((name, scope.type), Want(name, scope, fields))

    for spec in event.credentials:
        ref = _ref(spec.ref, context, "credentials")
        scope = Scope.of() if spec.scope == "global" else execution
        add(spec.name or str(ref), scope, ((None, ref),))

    for entry in _list(playbook.get("keychain")):
        if not isinstance(entry, dict) or entry.get("kind") != "secret_manager":
            continue
        name = entry.get("name")
        mapping = entry.get("map")
        if not isinstance(name, str) or not name or not isinstance(mapping, dict) or not mapping:
            raise BadEvent("invalid_event", "a keychain entry of kind secret_manager needs a name and a map")
        scope = Scope.of() if entry.get("scope") == "global" else execution
        fields = tuple((str(field), _ref(template, context, f"keychain.{name}")) for field, template in mapping.items())
        add(name, scope, fields)

    for auth in _auth_entries(playbook.get("workflow")):
        ref = _ref(auth.get("key"), context, "auth")
        add(str(ref), execution, ((None, ref),))
    return list(wants.values())


def _auth_entries(node: Any) -> Iterator[dict[str, Any]]:
    """Every `auth` entry with `provider: secret_manager`, wherever a step nests it (tool, loops, branches)."""
    if isinstance(node, dict):
        auth = node.get("auth")
        if isinstance(auth, dict):
            for entry in auth.values():
                if isinstance(entry, dict) and entry.get("provider") == "secret_manager":
                    yield entry
        for key, child in node.items():
            if key != "auth":
                yield from _auth_entries(child)
    elif isinstance(node, list):
        for child in node:
            yield from _auth_entries(child)


def _ref(template: Any, context: dict[str, Any], where: str) -> SecretRef:
    if not isinstance(template, str):
        raise BadEvent("invalid_event", f"{where}: a secret reference must be a string")
    try:
        rendered = _jinja.from_string(template).render(context) if "{" in template else template
    except Exception as exc:  # whatever a template does wrong (syntax, undefined, sandbox, 1/0, types) is bad input
        raise BadEvent("bad_template", f"{where}: {type(exc).__name__}: {str(exc)[:200]}") from None
    try:
        return SecretRef.parse(rendered)
    except InvalidReference:
        raise BadEvent("bad_reference", f"{where}: the rendered value is not a Secret Manager reference") from None


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []

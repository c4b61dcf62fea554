"""Which secrets a start event names, and under which keychain name and scope each is stored (its `Plan`).

Declarations, as NoETL's playbooks write them:
- `keychain:` entries of `kind: secret_manager`, or `kind: secrets` with a Secret Manager provider: under the entry's
  name, a value `{field: text}` for its `map`; without `map`, the text of the secret named by the entry's `name` in
  GOOGLE_CLOUD_PROJECT (latest). Scope: absent or `global` or `shared` = global; `local` = the execution.
- step `auth` entries with `provider: secret_manager` (anywhere in `workflow` or `workbook`: tools, loops,
  branches): `key`, and the oauth2 client-credentials form's `client_id_key` / `client_secret_key`, each stored under
  its rendered reference for the execution (as the seed does);
- our contract's `credentials` entries: under `name` when given, else under the rendered reference.
Everything else that names a credential is recognised and reported as skipped with a reason (never warmed): other
providers, tokens NoETL mints or holds itself, and NoETL's own credential table. A playbook declaration that cannot
be resolved at start (a template naming a step result, say) is skipped with its reason; the rest of the execution
is still warmed, and the worker's read-through covers the skipped one at run time. Only our contract's explicit
`credentials` make the event bad when they do not resolve (the producer asked for exactly those).

Templates render as NoETL renders them: the workload's keys at the top level and under `workload`, plus
`execution_id` and `catalog_id`; the event's workload over the playbook's; in a Jinja sandbox.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from jinja2 import StrictUndefined, Template, nodes
from jinja2.exceptions import SecurityError, UndefinedError
from jinja2.sandbox import SandboxedEnvironment

from keychain.errors import InvalidReference
from keychain.model import MAX_NAME_BYTES, RowIdentity, Scope, storable_text
from keychain.refs import SecretRef

from .events import BadEvent, ExecutionEvent

MAX_RENDERED = 2048  # a secret reference is short; anything longer is not one

# Providers whose secrets NoETL's server fetches from Google Secret Manager.
SECRET_MANAGER_PROVIDERS = frozenset({"gcp", "google", "secret_manager", "gcp_secret_manager"})
# Why a declaration was not warmed: a closed set (metric label, plan output). Never the input's own words.
SKIP_REASONS = frozenset({
    "other_provider",     # a provider other than Google Secret Manager (aws, azure, vault, k8s, env, ...)
    "google_id_token",    # NoETL mints an ID token from a service account
    "oauth2",             # a token NoETL obtains itself
    "bearer",             # a token NoETL holds itself
    "static",             # a value written in the playbook
    "credential_table",   # NoETL's own credential table (auth: NAME, credential: NAME, source: credential, ...)
    "unknown_kind",       # a keychain kind this warmer does not know
    "unresolved",         # a template names something not known at start (a step result, say)
    "bad_template",       # a template that does not render (syntax, sandbox, errors)
    "bad_reference",      # the rendered value is not a Secret Manager reference
    "no_project",         # a keychain entry without `map` needs GOOGLE_CLOUD_PROJECT
    "invalid_declaration",  # a declaration of the wrong shape (no name, a map that is not a mapping, ...)
    "residency_denied",   # `residency: strict` and the entry's region is not NoETL's server's: never fetched
})
_AUTH_REFERENCE_FIELDS = ("key", "client_id_key", "client_secret_key")
_SCOPES = {None: "global", "global": "global", "shared": "global", "local": "execution", "execution": "execution"}
RESIDENCY_POLICIES = ("none", "advisory", "strict")


# A secret reference template needs names, attributes, items, text, conditions and a few filters; nothing that loops,
# calls, repeats or multiplies. Checked on the parsed template, so rendering is bounded by the template's length and
# its inputs (no step or time budget needed, and nothing to interrupt on the event loop).
_ALLOWED_NODES = (nodes.Template, nodes.Output, nodes.TemplateData, nodes.Const, nodes.Name, nodes.Getattr,
                  nodes.Getitem, nodes.Filter, nodes.Concat, nodes.Add, nodes.CondExpr, nodes.If, nodes.Compare,
                  nodes.Operand, nodes.And, nodes.Or, nodes.Not, nodes.Test, nodes.Keyword)
_ALLOWED_FILTERS = frozenset({"default", "d", "lower", "upper", "trim", "string"})
_jinja = SandboxedEnvironment(undefined=StrictUndefined, autoescape=False)
_SECRET_ID = re.compile(r"[A-Za-z0-9_-]{1,255}")  # Secret Manager's own rule for a secret id
_BARE_NAME = re.compile(r"\{\{\s*([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)\s*\}\}")


@lru_cache(maxsize=4096)
def _compiled(template: str) -> Template:
    """Compiling costs about a millisecond and every execution of a playbook repeats the same templates."""
    tree = _jinja.parse(template)
    for node in tree.find_all(nodes.Node):
        refused_filter = isinstance(node, nodes.Filter) and node.name not in _ALLOWED_FILTERS
        if not isinstance(node, _ALLOWED_NODES) or refused_filter:
            raise SecurityError(f"{type(node).__name__} is not allowed in a secret reference")
    return _jinja.from_string(tree)


class Want:
    """One keychain row an execution needs: single-valued (`field` None) or a map of fields to references. Equal
    (and hashed) by name, scope and fields. A plain class with slots: a burst makes three per start event, and a
    frozen dataclass that derives fields costs several times more to make."""

    __slots__ = ("credential_name", "scope", "fields", "refs", "identity", "_hash")

    def __init__(self, credential_name: str, scope: Scope, fields: tuple[tuple[str | None, SecretRef], ...]):
        self.credential_name = credential_name
        self.scope = scope
        self.fields = fields
        # Made once each: a batch asks them of every want several times.
        self.refs: tuple[SecretRef, ...] = tuple(ref for _, ref in fields)
        self.identity: RowIdentity = scope.identity(credential_name)
        self._hash = hash((credential_name, scope, fields))

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Want) and self._hash == other._hash and self.credential_name == other.credential_name
                and self.scope == other.scope and self.fields == other.fields)

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        return f"Want({self.credential_name!r}, {self.scope!r}, {self.fields!r})"

    @classmethod
    def from_sources(cls, credential_name: str, scope: Scope, sources: str) -> "Want":
        """What to fetch again for an existing row, from its `sources` column (re-warm, keep-warm)."""
        return cls(credential_name, scope,
                   tuple((s.get("field"), SecretRef.parse(s["ref"])) for s in json.loads(sources)))

    def as_json(self) -> dict[str, Any]:
        return {"name": self.credential_name, "scope": self.scope.type,
                "refs": {name or "": str(ref) for name, ref in self.fields}}


@dataclass(frozen=True)
class Skip:
    """A declaration that is not warmed: where it is (for a keychain entry, its name) and why (SKIP_REASONS)."""

    where: str
    reason: str

    def as_json(self) -> dict[str, str]:
        return {"where": self.where, "reason": self.reason}


@dataclass
class Plan:
    wants: list[Want] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)


class Unusable(Exception):
    """One declaration cannot be warmed; `reason` is in SKIP_REASONS (or the noetl target's own)."""

    def __init__(self, reason: str):
        self.reason = reason


def resolve(event: ExecutionEvent, playbook: dict[str, Any] | None = None, *, project: str | None = None,
            server_region: str = "") -> Plan:
    """The plan of a start event. `playbook`: the document from NoETL's catalog (else the event's own, if any).
    `server_region`: NOETL_SERVER_REGION, for the residency gate of keychain entries."""
    plan = Plan()
    if event.workload is None:  # a start record without a workload (the Rust server's workflow.initialized)
        return plan
    from_catalog = playbook is not None
    if playbook is None:
        playbook = event.playbook if isinstance(event.playbook, dict) else {}
    workload = {**_mapping(playbook.get("workload")), **event.workload}
    context = {**workload, "workload": workload, "execution_id": event.execution_id, "catalog_id": event.catalog_id}
    execution = Scope.of(execution_id=event.execution_id)
    wants: dict[tuple[str, str], Want] = {}

    def add(name: str, scope: Scope, fields: tuple[tuple[str | None, SecretRef], ...]) -> None:
        wants.setdefault((name, scope.type), Want(name, scope, fields))

    for index, spec in enumerate(event.credentials):
        where = f"credentials[{index}]"
        try:
            ref = _ref(spec.ref, context)
        except Unusable as unusable:  # the producer named exactly this secret: the event itself is wrong
            reason = "bad_reference" if unusable.reason == "bad_reference" else "bad_template"
            raise BadEvent(reason, f"{where}: {reason.replace('_', ' ')}") from None
        add(spec.name or str(ref), Scope.of() if spec.scope == "global" else execution, ((None, ref),))

    for index, entry in enumerate(_list(playbook.get("keychain"))):
        where = _entry_name(entry) or f"keychain[{index}]"
        try:
            name, scope_type, fields = _keychain_entry(entry, context, project, server_region)
        except Unusable as unusable:
            plan.skipped.append(Skip(where, unusable.reason))
            continue
        add(name, execution if scope_type == "execution" else Scope.of(), fields)

    for where, auth in _step_declarations(playbook, cached=from_catalog):
        try:
            refs = _auth_refs(auth, context)
        except Unusable as unusable:
            plan.skipped.append(Skip(where, unusable.reason))
            continue
        for ref in refs:
            add(str(ref), execution, ((None, ref),))
    plan.wants = list(wants.values())
    return plan


# --- keychain entries -------------------------------------------------------------------------------------------
def _keychain_entry(entry: Any, context: dict[str, Any], project: str | None, server_region: str):
    if not isinstance(entry, dict):
        raise Unusable("invalid_declaration")
    kind, provider = entry.get("kind"), entry.get("provider")
    if kind == "secrets" and not (isinstance(provider, str) and provider in SECRET_MANAGER_PROVIDERS):
        raise Unusable("other_provider")
    if kind not in ("secret_manager", "secrets"):
        raise Unusable(kind_reason(kind))
    name, mapping = entry.get("name"), entry.get("map")
    scope_type = _SCOPES.get(entry.get("scope")) if isinstance(entry.get("scope"), (str, type(None))) else None
    if not storable(name) or scope_type is None:
        raise Unusable("invalid_declaration")
    residency(entry, server_region)  # before any fetch, as NoETL's server gates it
    if mapping is None:  # the single secret named by the entry's name
        return name, scope_type, ((None, secret_manager_name(name, project)),)
    if not isinstance(mapping, dict) or not mapping or not all(storable(f, 256) for f in mapping):
        raise Unusable("invalid_declaration")
    return name, scope_type, tuple((f, secret_manager_name(render_text(template, context), project))
                                   for f, template in mapping.items())


def residency(entry: dict[str, Any], server_region: str) -> bool:
    """NoETL's residency gate for one keychain entry (noetl/server `src/secrets/residency.rs` `evaluate`, before any
    fetch): Unusable("residency_denied") where the server refuses the entry; True where it allows it as an advisory
    violation; False where it allows it. Every target asks it: a declaration NoETL's server would refuse is never
    fetched for anyone (KEYCHAIN_TARGET=both included). `server_region`: NOETL_SERVER_REGION."""
    policy = entry.get("residency") or "none"
    allowed = entry.get("allowed_regions", [])
    if policy not in RESIDENCY_POLICIES or not isinstance(allowed, list):
        raise Unusable("invalid_declaration")  # the server's playbook parse refuses it: it resolves nothing
    region = entry.get("region") if isinstance(entry.get("region"), str) and entry.get("region") else server_region
    if not region or policy == "none" or region == server_region or (server_region and server_region in allowed):
        return False
    if policy == "strict":
        raise Unusable("residency_denied")
    return True


def secret_manager_name(name: str, project: str | None) -> SecretRef:
    """A keychain entry's secret as NoETL's gcp provider names it (its `build_access_url`): a full
    `projects/P/secrets/S/versions/V` (or a regional `projects/P/locations/L/secrets/S/...`) as written, a full name
    at `latest`, a bare `S` in the deployment's project (GOOGLE_CLOUD_PROJECT) at `latest`."""
    if name.startswith("projects/"):
        text = name if "/versions/" in name else f"{name}/versions/latest"
    elif not _SECRET_ID.fullmatch(name):
        raise Unusable("bad_reference")
    elif not project:
        raise Unusable("no_project")
    else:
        text = f"projects/{project}/secrets/{name}/versions/latest"
    return _parse(text)


def _entry_name(entry: Any) -> str | None:
    name = entry.get("name") if isinstance(entry, dict) else None
    return name[:200] if isinstance(name, str) and name else None


def kind_reason(kind: Any) -> str:
    if kind in ("google_id_token", "oauth2", "bearer", "static"):
        return kind
    return "credential_table" if kind == "credential" else "unknown_kind"


# --- step auth --------------------------------------------------------------------------------------------------
_SINGLE_AUTH_KEYS = frozenset({"provider", "source", "type", "kind", "key", "credential"})
# A catalog playbook never changes, and a burst resolves the same few thousands of times: its declarations are found
# once (by the dictionary's identity; the entry keeps it alive, so the identity is never reused meanwhile).
_CATALOG_DECLARATIONS: OrderedDict[int, tuple[dict, list[tuple[str, Any]]]] = OrderedDict()
_CATALOG_DECLARATIONS_KEPT = 256


def _step_declarations(playbook: dict[str, Any], *, cached: bool) -> list[tuple[str, Any]]:
    if not cached:
        return _auth_entries({k: playbook.get(k) for k in ("workflow", "workbook")})
    found = _CATALOG_DECLARATIONS.get(id(playbook))
    if found is None or found[0] is not playbook:
        found = _CATALOG_DECLARATIONS[id(playbook)] = (
            playbook, _auth_entries({k: playbook.get(k) for k in ("workflow", "workbook")}))
        while len(_CATALOG_DECLARATIONS) > _CATALOG_DECLARATIONS_KEPT:
            _CATALOG_DECLARATIONS.popitem(last=False)
    return found[1]


def _auth_entries(root: Any) -> list[tuple[str, Any]]:
    """(where, declaration) for every credential a step names, in document order: `auth` entries (one, or a mapping
    of named ones) and `credential: NAME`, wherever a step nests them (tools, loops, branches, workbook tasks)."""
    found: list[tuple[str, Any]] = []
    stack: list[tuple[Any, str]] = [(root, "")]
    while stack:
        node, step = stack.pop()
        if isinstance(node, dict):
            if isinstance(node.get("step"), str):
                step = node["step"][:200]
            elif isinstance(node.get("task"), str):
                step = node["task"][:200]
            auth = node.get("auth")
            if auth is not None:
                if isinstance(auth, dict) and auth.keys().isdisjoint(_SINGLE_AUTH_KEYS):  # several, named
                    found.extend((f"{step}.auth.{str(name)[:100]}", entry) for name, entry in auth.items())
                elif auth != {}:
                    found.append((f"{step}.auth", auth))
            if "credential" in node and not isinstance(node.get("credential"), (dict, list)):
                found.append((f"{step}.credential", {"source": "credential"}))
            stack.extend((child, step) for key, child in reversed(node.items())
                         if key not in ("auth", "credential") and isinstance(child, (dict, list)))
        elif isinstance(node, list):
            stack.extend((child, step) for child in reversed(node) if isinstance(child, (dict, list)))
    return found


def _auth_refs(entry: Any, context: dict[str, Any]) -> list[SecretRef]:
    if not isinstance(entry, dict):  # auth: NAME or auth: "{{ pg_auth }}": a row of NoETL's credential table
        raise Unusable("credential_table")
    provider = entry.get("provider")
    if provider == "secret_manager":
        refs = [_ref(entry[f], context) for f in _AUTH_REFERENCE_FIELDS if f in entry]
        if not refs:
            raise Unusable("invalid_declaration")
        return refs
    if provider is not None:
        raise Unusable("other_provider")
    if entry.get("source") == "credential" or "credential" in entry:
        raise Unusable("credential_table")
    kind = entry.get("type", entry.get("kind"))
    raise Unusable(kind_reason(kind) if kind is not None else "credential_table")


# --- templates --------------------------------------------------------------------------------------------------
def _ref(template: Any, context: dict[str, Any]) -> SecretRef:
    return _parse(render_text(template, context))


def render_text(template: Any, context: dict[str, Any]) -> str:
    """A declaration's template rendered against `context`, in the sandbox; Unusable with the reason otherwise (a
    name not known at start is `unresolved`)."""
    if not isinstance(template, str) or not template or len(template) > MAX_RENDERED:
        raise Unusable("invalid_declaration")
    try:
        return _render(template, context) if "{" in template else template
    except UndefinedError:
        raise Unusable("unresolved") from None
    except Exception:  # whatever a template does wrong (syntax, sandbox, 1/0, types) is bad input
        raise Unusable("bad_template") from None


def _render(template: str, context: dict[str, Any]) -> str:
    """NoETL's usual form, a bare `{{ name }}` or `{{ workload.name }}` naming a text, is looked up as Jinja would
    look it up, without a render (a quarter of a millisecond each, three per event); anything else is rendered."""
    bare = _BARE_NAME.fullmatch(template)
    if bare is not None:
        value: Any = context
        for part in bare.group(1).split("."):
            if not isinstance(value, dict) or part not in value or hasattr(dict, part):
                break  # Jinja would look for an attribute first, or fail: let it
            value = value[part]
        else:
            if isinstance(value, str):
                return value
    return _compiled(template).render(context)


def _parse(text: str) -> SecretRef:
    try:
        return SecretRef.parse(text)
    except InvalidReference:
        raise Unusable("bad_reference") from None


def storable(value: Any, max_bytes: int = MAX_NAME_BYTES) -> bool:
    try:
        return isinstance(value, str) and bool(value) and storable_text(value, max_bytes) == value
    except ValueError:
        return False


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []

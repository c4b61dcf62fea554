"""What NoETL's server itself would resolve through Google Secret Manager for one execution, and under which cache
key it would look for it (facts from noetl/server: `src/services/credential.rs`, `src/secrets/resolver.rs`,
`src/secrets/gcp.rs`, `src/db/queries/keychain.rs`; its code does not carry over, its behaviour does):

- A step's `{{ keychain.<alias>.* }}` or `auth: <alias>` makes the server look in `noetl.keychain` under the cache key
  `{alias}:{catalog_id}:{execution_id}` (scope `local`, whatever the playbook's `scope:` says), the catalog id and
  the workload being the execution's start record's (`playbook_started`: `catalog_id`, `context.workload`).
- On a miss it finds the playbook's first `keychain:` entry of that name (a later entry of the same name is never
  read, even when the first is not Secret Manager's). Only `provider: gcp` is Google Secret Manager (its other
  providers are AWS, Azure, Vault, Kubernetes, IAM token minting); an entry without a provider is NoETL's credential
  table (`credential:`) or a token it mints.
- Residency (`src/secrets/residency.rs`), before any fetch: the entry's `region` (else the server's own,
  NOETL_SERVER_REGION) against the server's region. Unset region: allowed. `residency: none` (the default): allowed.
  The same region, or the server's region in `allowed_regions`: allowed. Otherwise `strict` refuses the entry
  (skipped `residency_denied`: a warmed row would bypass the gate) and `advisory` allows it, counted.
- With `map`, the value is `{field: secret text}`, each field's template rendered against the start record's workload
  alone (its keys at the top level; nothing else); without `map`, the value is the text of the secret named by the
  alias. A name is used as Secret Manager names it: a full `projects/P/secrets/S/versions/V` as written, a full
  `projects/P/secrets/S` at `latest`, a bare `S` in GOOGLE_CLOUD_PROJECT (else GCP_PROJECT) at `latest`. An empty
  `map: {}` resolves to `{}` with no fetch at all.
- `noetl.credential` is asked first (`src/services/credential.rs` `get`): a credential of the alias's name (or id)
  always wins, and the keychain is never looked up for it, so warming it would only cost a Secret Manager call
  (skipped `credential_table`, like every alias the credential table answers, see the target). A `kind: credential`
  entry (no `provider:`) resolves through that table and is never cached by the server: never warmed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from keychain.refs import SecretRef

from ...events import ExecutionEvent
from ...resolve import Skip, Unusable, kind_reason, render_text, residency, secret_manager_name, storable

# NoETL's server builds its Google Secret Manager provider for exactly this name (src/secrets/mod.rs).
SECRET_MANAGER_PROVIDER = "gcp"
# Why an alias is not warmed for NoETL's server: a closed set (metric label, plan output).
SKIP_REASONS = frozenset({
    "other_provider", "google_id_token", "oauth2", "bearer", "static",
    "credential_table",     # NoETL's credential table answers it: a `kind: credential` entry, or a credential row of
                            # the alias's name or id (which always wins over the keychain)
    "unresolved", "bad_template", "bad_reference", "no_project", "invalid_declaration",
    "no_provider",          # an entry without `provider:` (even `kind: secret_manager`): the server fetches nothing
    "no_catalog_id",        # the start record names no catalog row: there is no cache key the server would read
    "residency_denied",     # `residency: strict` and the entry's region is not the server's: the server refuses it
    "regional_secret",      # projects/P/locations/L/...: the server asks Google's global endpoint, which refuses it
})


@dataclass(frozen=True)
class NoetlWant:
    """One row of NoETL's keychain an execution's steps will ask NoETL's server for."""

    alias: str
    catalog_id: int
    execution_id: int
    parent_execution_id: int | None
    fields: tuple[tuple[str | None, SecretRef], ...]  # (map field, reference); one (None, ref) without a map
    residency_violation: bool = field(default=False, compare=False)  # `advisory`, and not the server's region

    refs: tuple[SecretRef, ...] = field(init=False, repr=False, compare=False)
    cache_key: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "refs", tuple(ref for _, ref in self.fields))
        object.__setattr__(self, "cache_key", cache_key(self.alias, self.catalog_id, self.execution_id))

    @property
    def identity(self) -> str:  # what the warm deduplicates on
        return self.cache_key

    def as_json(self) -> dict[str, Any]:
        answer = {"cache_key": self.cache_key, "alias": self.alias,
                  "refs": {name or "": str(ref) for name, ref in self.fields}}
        if self.residency_violation:
            answer["residency"] = "violation_allowed"  # advisory: warmed, and counted
        return answer


@dataclass
class NoetlPlan:
    wants: list[NoetlWant] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)


def cache_key(alias: str, catalog_id: int, execution_id: int) -> str:
    """NoETL's `build_cache_key` for scope `local` with an execution id."""
    return f"{alias}:{catalog_id}:{execution_id}"


def noetl_plan(event: ExecutionEvent, playbook: dict[str, Any] | None, *, project: str | None,
               server_region: str = "") -> NoetlPlan:
    """The rows NoETL's server would write on a miss for this start record, and the aliases it would not resolve
    through Secret Manager (with the reason). `project`: of bare secret names; `server_region`: NOETL_SERVER_REGION."""
    plan = NoetlPlan()
    if event.workload is None or not isinstance(playbook, dict):  # a start record that carries no workload
        return plan
    entries = playbook.get("keychain")
    if not isinstance(entries, list) or not entries:
        return plan
    if event.catalog_id is None:
        plan.skipped.append(Skip("keychain", "no_catalog_id"))
        return plan
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        name = entry.get("name") if isinstance(entry, dict) else None
        where = name[:200] if isinstance(name, str) and name else f"keychain[{index}]"
        if isinstance(name, str):
            if name in seen:  # the server reads an alias's first entry only, whatever became of it
                continue
            seen.add(name)
        try:
            fields, violation = _entry_fields(entry, event.workload, project, server_region)
        except Unusable as unusable:
            plan.skipped.append(Skip(where, unusable.reason))
            continue
        plan.wants.append(NoetlWant(name, event.catalog_id, event.execution_id, event.parent_execution_id, fields,
                                    violation))
    return plan


def _entry_fields(entry: Any, workload: dict[str, Any], project: str | None, server_region: str):
    """An entry's (map field, reference) pairs and whether it is an advisory residency violation, in the server's
    order: the provider, then the residency gate, then the templates."""
    if not isinstance(entry, dict) or not storable(entry.get("name")):
        raise Unusable("invalid_declaration")
    provider = entry.get("provider")
    if provider is None:
        raise Unusable("credential_table" if "credential" in entry else _kind(entry.get("kind")))
    if provider != SECRET_MANAGER_PROVIDER:
        raise Unusable("other_provider")
    violation = residency(entry, server_region)
    mapping = entry.get("map")
    if mapping is None:
        fields = ((None, secret_manager_name(entry["name"], project)),)
    elif not isinstance(mapping, dict) or not all(
            storable(f, 256) and isinstance(t, str) for f, t in mapping.items()):
        raise Unusable("invalid_declaration")
    else:
        fields = tuple((f, secret_manager_name(render_text(template, workload), project))
                       for f, template in mapping.items())
    if any(ref.location for _, ref in fields):  # noetl/server v3.83 src/secrets/gcp.rs: one global endpoint
        raise Unusable("regional_secret")
    return fields, violation


def _kind(kind: Any) -> str:
    reason = kind_reason(kind)
    return "no_provider" if reason == "unknown_kind" else reason

"""The target interface. The warm, the re-warm after a rotation, the purge and the sweep decide WHAT to do
(streams/warm.py, streams/invalidate.py); a target decides WHERE and in WHICH format, behind one interface, the
implementations side by side (as procrastinate's connectors are):

- `keychain` (targets/keychain.py): our own table, through the `keychain` library, read by workers that use it;
- `noetl` (targets/noetl/): NoETL's own `noetl.keychain`, under NoETL's cache keys and in NoETL's envelope, read by
  NoETL's unmodified server.

`KEYCHAIN_TARGET` picks `keychain` (the default), `noetl` or `both` (the factory: targets/__init__.py). Every fetch is shared by the targets (one Secret
Manager call per secret per burst, whatever writes it), and every write of every target is fenced by the secrets'
rotation generations and by the executions' finish, in the library (Rows.put_many, Rows.write_fenced: keychain/rows.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import asyncpg

from keychain.errors import KeychainError
from keychain.fetcher import Fetched
from keychain.invalidation import Selection
from keychain.maintenance import Beside
from keychain.model import held_token
from keychain.projects import ProjectNumbers
from keychain.refs import SecretIdentity
from keychain.rows import Written

from ..events import ExecutionEvent
from ..resolve import Skip

__all__ = ["Beside", "Fetched", "Filled", "Purge", "Selection", "Target", "TargetError", "TargetPlan", "Written",
           "holdings", "together"]


class TargetError(KeychainError):
    """A target's own store did not do what was asked. `permanent`: it refused for good (trying again changes
    nothing until an operator acts: an expired token, a rejected request); `reason` names it (a closed set)."""

    reason = "unavailable"
    permanent = False


@dataclass(frozen=True)
class Filled:
    """A wanted row with what Secret Manager gave for it: a value per reference, or the refusal's error code."""

    want: Any  # the target's own want (streams.resolve.Want, NoetlWant): `.fields`, `.refs`, `.identity`
    values: dict[str, Fetched] = field(default_factory=dict)  # by str(ref)
    error_code: str | None = None

    @property
    def fences(self) -> tuple[tuple[str, int], ...]:
        """Each value's fence: (its secret's identity, the generation read before it was fetched). Two references of
        one secret (`latest` and `versions/7`) are two values, each fenced on its own reading."""
        return tuple(dict.fromkeys(self.values[str(ref)].fence_pair for ref in self.want.refs))


async def holdings(wants: list[Any], projects: ProjectNumbers) -> dict[int, frozenset[str]]:
    """What each want's row would hold (model.held_token: field, secret's identity, version as referenced), by
    id(want), to compare with what a row or a copy holds now (model.held_of). The projects named by id are looked up
    first, so that a row written from an answer (by number) compares equal to its reference by id."""
    await projects.load(ref.project for want in wants for ref in want.refs)
    return {id(want): frozenset(held_token(name, projects.known(ref), ref.version) for name, ref in want.fields)
            for want in wants}


@dataclass
class TargetPlan:
    wants: list[Any] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)


@dataclass(frozen=True)
class Purge:
    """What a target deletes from its own store when an execution ends: `delete` runs inside the library's finish
    transaction (Keychain.finish_execution: fenced, run again whole on a deadlock) and returns its rows deleted;
    `committed` counts them once that transaction has committed."""

    delete: Beside
    committed: Callable[[], None]


def together(besides: Sequence[Beside]) -> Beside | None:
    """Several targets' work in one of the library's transactions, one after the other (the lock order's class 4
    for each); None when there is none."""
    if not besides:
        return None

    async def every(conn: asyncpg.Connection) -> int:
        return sum([await beside(conn) for beside in besides])

    return every


class Target(Protocol):
    name: str  # `keychain` or `noetl`: a closed set (the `target` metric label)
    # Whether it keeps rows in a store of its own (NoETL's keychain), which an invalidation then reaches through the
    # outbox (streams/deferred.py) instead of inside the library's transaction.
    keeps_own_store: bool

    def plan(self, event: ExecutionEvent, playbook: dict[str, Any] | None) -> TargetPlan:
        """The rows a start event makes this target want, and the declarations it skips (with their reasons)."""

    async def not_yet_warm(self, wants: list[Any]) -> list[Any]:
        """The wants without a ready row that holds the same secrets for at least half this target's TTL (a
        redelivered start, a credential already shared)."""

    async def write(self, filled: Sequence[Filled]) -> Written[Filled]:
        """Write the rows (a refusal as this target records one, if it does). Says which were written, which were
        fenced (a secret they hold was invalidated after its generation was read: the warm fetches them again) and
        which failed for a reason that may pass (the warm tries them again until its deadline)."""

    def purge(self, execution_id: int) -> Purge | None:
        """What the end of an execution deletes from this target's own store, beside the library's finish of it
        (which fences it against late writes and deletes its rows from the library's table); None: nothing more."""

    def stop_serving(self, selection: Selection, *, drop: bool) -> Beside | None:
        """What an invalidation does to this target's rows in its own store, inside the transaction that applies its
        outbox entry (keychain/outbox.py; None: the library's own rows only)."""

    async def stale_wants(self, selection: Selection) -> list[Any]:
        """A secret's rows an invalidation stopped serving that running executions still need (the re-warm)."""

    async def globals_to_refresh(self, within_seconds: float) -> list[Any]:
        """Keep warm: global rows that are read and about to expire."""

    async def stale_secrets(self, limit: int) -> list[SecretIdentity]:
        """Secrets whose rows were invalidated elsewhere and not refreshed yet."""

    async def sweep(self) -> int:
        """Delete expired rows in bounded batches; returns how many."""

    async def close(self) -> None: ...

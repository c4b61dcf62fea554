"""Where the warmer writes: a target. The warm, the re-warm after a rotation, the purge and the sweep decide WHAT to
do (streams/warm.py, streams/invalidate.py); a target decides WHERE and in WHICH format, behind one interface, the
implementations side by side (as procrastinate's connectors are):

- `keychain` (targets/keychain.py): our own table, through the `keychain` library, read by workers that use it;
- `noetl` (targets/noetl/): NoETL's own `noetl.keychain`, under NoETL's cache keys and in NoETL's envelope, read by
  NoETL's unmodified server.

`KEYCHAIN_TARGET` picks `keychain` (the default), `noetl` or `both`. Every fetch is shared by the targets (one Secret
Manager call per secret per burst, whatever writes it), and every write of every target is fenced by the secrets'
rotation generations and by the executions' finish, in the library (Keychain.put_many, Keychain.write_fenced).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import asyncpg

from keychain.sources import SecretValue
from keychain.store import Beside, Keychain

from ..events import ExecutionEvent
from ..resolve import Skip
from ..settings import WorkerSettings

TARGET_NAMES = ("keychain", "noetl")  # a closed set: the `target` metric label


@dataclass(frozen=True)
class Fetched:
    value: SecretValue
    generation: int  # of the secret, read before the value was fetched: the write is fenced on it


@dataclass(frozen=True)
class Filled:
    """A wanted row with what Secret Manager gave for it: a value per reference, or the refusal's error code."""

    want: Any  # the target's own want (streams.resolve.Want, NoetlWant): `.fields`, `.refs`, `.secrets`, `.identity`
    values: dict[str, Fetched] = field(default_factory=dict)  # by str(ref)
    error_code: str | None = None

    @property
    def fences(self) -> tuple[tuple[str, int], ...]:
        return tuple({ref.secret: self.values[str(ref)].generation for _, ref in self.want.fields}.items())


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
    name: str  # in TARGET_NAMES

    def plan(self, event: ExecutionEvent, playbook: dict[str, Any] | None) -> TargetPlan:
        """The rows a start event makes this target want, and the declarations it skips (with their reasons)."""

    async def not_yet_warm(self, wants: list[Any]) -> list[Any]:
        """The wants without a ready row that holds the same secrets for at least half this target's TTL (a
        redelivered start, a credential already shared)."""

    async def write(self, filled: Sequence[Filled]) -> list[Filled]:
        """Write the rows (a refusal as this target records one, if it does); returns those NOT written because a
        secret they hold was invalidated after its generation was read (the warm fetches them again)."""

    def purge(self, execution_id: int) -> Purge | None:
        """What the end of an execution deletes from this target's own store, beside the library's finish of it
        (which fences it against late writes and deletes its rows from the library's table); None: nothing more."""

    def stop_serving(self, secret_id: str, match: dict[str, Any], *, drop: bool) -> Beside | None:
        """What an invalidation does to this target's rows, inside the library's invalidation transaction (None: the
        library's own rows only)."""

    async def stale_wants(self, secret_id: str, match: dict[str, Any]) -> list[Any]:
        """The rows an invalidation stopped serving that running executions still need (the re-warm)."""

    async def stale_secret_ids(self, limit: int) -> list[str]:
        """Secrets whose rows were invalidated elsewhere and not refreshed yet."""

    async def sweep(self) -> int:
        """Delete expired rows in bounded batches; returns how many."""

    async def close(self) -> None: ...


async def open_targets(settings: WorkerSettings, keychain: Keychain) -> list[Target]:
    """KEYCHAIN_TARGET's targets: our table, NoETL's, or both."""
    targets: list[Target] = []
    from .keychain import KeychainTarget

    if "keychain" in settings.targets:
        targets.append(KeychainTarget(keychain, project=settings.google_cloud_project))
    if "noetl" in settings.targets:
        from .noetl.kek import DataKeys
        from .noetl.table import NoetlTarget

        data_keys = DataKeys(noetl_kek(settings), ahead=settings.noetl_data_keys_ahead)
        targets.append(await NoetlTarget.open(settings, keychain, data_keys))
    return targets


def noetl_kek(settings: WorkerSettings):
    """NoETL's key-encryption key from NoETL's own variables (ConfigurationError, one line, when one is missing)."""
    from .noetl.kek import kek_from

    key = settings.noetl_encryption_key.get_secret_value() if settings.noetl_encryption_key else None
    return kek_from(settings.noetl_kms_provider, key, settings.noetl_gcp_kms_key, settings.kms_endpoint)


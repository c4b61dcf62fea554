"""Where the warmer writes: the targets KEYCHAIN_TARGET names, built here and nowhere else (the interface:
targets/base.py; the implementations side by side: keychain.py, noetl/)."""

from __future__ import annotations

from keychain.store import Keychain

from ..settings import WorkerSettings
from .base import Target


async def open_targets(settings: WorkerSettings, keychain: Keychain) -> list[Target]:
    """KEYCHAIN_TARGET's targets: our table, NoETL's, or both."""
    targets: list[Target] = []
    if "keychain" in settings.targets:
        from .keychain import KeychainTarget

        targets.append(KeychainTarget(keychain, project=settings.google_cloud_project,
                                      server_region=settings.noetl_server_region))
    if "noetl" in settings.targets:
        from .noetl.table import NoetlTarget

        targets.append(await NoetlTarget.open(settings, keychain))
    return targets

"""Project ids and their numbers, learned from Secret Manager's answers (refs.SecretIdentity).

A reference may name its project by id (`projects/prod-1/secrets/db`); Secret Manager answers every access with the
version's name by project NUMBER (`projects/1014428265962/secrets/db/versions/3`). The first answer for a project
teaches its number for good (a project id never changes its number): it is kept in this process and recorded in
`keychain_project` for every other process. Until then the project is unknown (UNKNOWN_PROJECT), which is never
taken for any known project.
"""

from __future__ import annotations

import logging
from typing import Iterable

from .database import Connector
from .errors import InvalidReference
from .refs import SecretIdentity, SecretRef

log = logging.getLogger("keychain")


class ProjectNumbers:
    def __init__(self, connector: Connector):
        self._db = connector
        self._numbers: dict[str, str] = {}  # project id -> number, learned (never forgotten: it never changes)

    def known(self, ref: SecretRef) -> SecretIdentity:
        """The reference's secret's identity from what this process knows (no round trip)."""
        return ref.identity(self._numbers.get(ref.project))

    async def identity(self, ref: SecretRef) -> SecretIdentity:
        """The reference's secret's identity: its project's number as written, known here, or recorded by any process;
        else with its project unknown."""
        if not ref.project.isdigit() and ref.project not in self._numbers:
            await self.load([ref.project])
        return self.known(ref)

    async def load(self, project_ids: Iterable[str]) -> None:
        """Learn the numbers other processes recorded for these project ids (one statement for all of them)."""
        wanted = sorted({p for p in project_ids if not p.isdigit() and p not in self._numbers})
        if wanted:
            for row in await self._db.fetch("project_numbers", wanted):
                self._numbers[row["project_id"]] = row["project_number"]

    async def learn(self, ref: SecretRef, answered_name: str) -> None:
        """What Secret Manager answered for `ref` (a version's name, by project number): the first time, the number
        of the project `ref` names by id, for every process."""
        try:
            answered = SecretRef.parse(answered_name)
        except InvalidReference:
            return
        number = answered.project
        if not number.isdigit() or ref.project.isdigit() or self._numbers.get(ref.project) == number:
            return
        self._numbers[ref.project] = number
        try:
            await self._db.pool.execute(self._db.q["learn_project_number"], ref.project, number)
        except Exception as exc:  # this process knows it; the others learn it from their own first answer
            log.warning("the number of a project was not recorded: %s", type(exc).__name__)

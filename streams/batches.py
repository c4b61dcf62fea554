"""What the one durable consume loop (streams/agents.py) hands to the domain and gets back: consumed records, dead
letters, and the retry that holds a batch while the database is down. No faust here."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Protocol, TypeVar

from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential_jitter

from keychain.errors import CONNECTION_ERRORS, KeychainConflict, KeychainUnavailable

log = logging.getLogger(__name__)
T = TypeVar("T")

# A database that is down or restarting (or, rarely, kept rolling a write back for concurrent ones past the
# library's own retries): the batch is held and retried, in order, until it is taken.
DATABASE_DOWN = (KeychainUnavailable, KeychainConflict, *CONNECTION_ERRORS)


@dataclass
class Record:
    """One consumed message."""

    key: bytes | None
    value: bytes | None
    topic: str = ""
    partition: int = 0
    offset: int = 0

    @property
    def source(self) -> str:
        return f"{self.topic}/{self.partition}/{self.offset}"


@dataclass
class DeadLetter:
    record: Record
    reason: str  # from a closed set: a metric label and a DLQ header
    detail: str


class Handled(Protocol):
    """What a batch handler returns: its dead letters, and one line for the log."""

    dead: list[DeadLetter]

    def summary(self) -> str: ...


@dataclass
class Failed:
    """A batch whose handler failed for a reason that is not the database: every record is kept, in the DLQ."""

    dead: list[DeadLetter] = field(default_factory=list)

    def summary(self) -> str:
        return f"{len(self.dead)} dead-lettered (internal_error)"


async def hold_until_written(work: Callable[[], Awaitable[T]]) -> T:
    """Run `work` until the database takes it: an outage holds the stream (in order) instead of losing events.
    Every handler is idempotent, so a batch may run again whole."""
    try:  # the first attempt outside the retry machinery: it is nearly always the only one, thousands a second
        return await work()
    except DATABASE_DOWN:
        pass
    retrying = AsyncRetrying(
        retry=retry_if_exception_type(DATABASE_DOWN), wait=wait_exponential_jitter(multiplier=0.1, max=5), reraise=True
    )
    async for attempt in retrying:
        with attempt:
            log.warning("database unavailable; retrying (attempt %d)", attempt.retry_state.attempt_number + 1)
            return await work()
    raise AssertionError("unreachable")


async def handle_batch(records: list[Record], handle: Callable[[list[Record]], Awaitable[Handled]]) -> Handled:
    """The batch, held through database outages; a bug dead-letters the batch's records and the stream goes on."""
    try:
        return await hold_until_written(lambda: handle(records))
    except Exception as exc:
        log.exception("batch failed; dead-lettering its %d records", len(records))
        return Failed([DeadLetter(r, "internal_error", type(exc).__name__) for r in records])

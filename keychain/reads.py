"""Read bookkeeping: the hits a process served, counted in memory and written to their rows in one statement.

A hit is a plain `SELECT` (one index lookup, no row lock, no new row version): the seed's bookkeeping (`accessed_at`,
`access_count`) and the first-read counter (`reads_since_write`) reach the row at most KEYCHAIN_READ_FLUSH_SECONDS
later, for every row this process read meanwhile at once (`count_reads`). Counting in the read itself made every hit
an `UPDATE`: about 0.3x a `SELECT 1` more per read on the hit path, for figures nobody reads within a second.
`accessed_at` is the moment of the row's last read, told to the database as an age (no clock skew between hosts).
Counts not yet written when a process dies without closing its Keychain are lost (a second's reads at most); counts
a failed statement did not write are kept for the next one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from .database import Connector, retrying

log = logging.getLogger("keychain")


@dataclass
class _Counted:
    write_id: int | None  # the write last read: reads of an earlier write do not count towards reads_since_write
    reads_of_write: int
    reads: int
    last_read: float  # time.monotonic()


class ReadCounts:
    """`counted` on every hit, written by a task that runs once per KEYCHAIN_READ_FLUSH_SECONDS while reads come."""

    def __init__(self, connector: Connector):
        self._db = connector
        self._pending: dict[int, _Counted] = {}  # row id -> its reads not yet written
        self._flusher: asyncio.Future[None] | None = None
        self._sleeping = False  # the flusher is waiting for its moment (not writing): close may cancel it

    def counted(self, row_id: int, write_id: int | None, reads_since_write: int) -> bool:
        """Count one hit of a row; True when it is the first read of the value the row holds (across processes: as
        far as the row tells, plus this process's reads not yet written)."""
        counted = self._pending.get(row_id)
        if counted is None:
            counted = self._pending[row_id] = _Counted(write_id, 0, 0, 0.0)
            first = reads_since_write == 0
        elif counted.write_id != write_id:  # the row was written again since this process last read it
            counted.write_id, counted.reads_of_write = write_id, 0
            first = reads_since_write == 0
        else:
            first = False
        counted.reads_of_write += 1
        counted.reads += 1
        counted.last_read = time.monotonic()
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.ensure_future(self._flush_later())
        return first

    async def _flush_later(self) -> None:
        self._sleeping = True
        try:
            await asyncio.sleep(self._db.settings.read_flush_seconds)
        finally:
            self._sleeping = False
        await self.flush()

    async def flush(self) -> int:
        """Write every count held now; returns the rows updated. A failure keeps the counts for the next flush."""
        if not self._pending or not self._db.is_open:
            return 0
        pending, self._pending = self._pending, {}
        ids = list(pending)  # the statement locks them in the lock order (sql/queries.sql)
        now = time.monotonic()
        try:
            result = await retrying("count_reads", lambda: self._db.pool.execute(
                self._db.q["count_reads"], ids, [pending[i].write_id for i in ids],
                [pending[i].reads_of_write for i in ids], [pending[i].reads for i in ids],
                [now - pending[i].last_read for i in ids],
            ))
        except Exception as exc:
            log.warning("read counts of %d rows not written yet (%s); kept for the next flush", len(ids),
                        type(exc).__name__)
            for row_id, counted in pending.items():
                self._keep(row_id, counted)
            return 0
        return int(result.rpartition(" ")[2] or 0)

    def _keep(self, row_id: int, counted: _Counted) -> None:
        newer = self._pending.get(row_id)
        if newer is None:
            self._pending[row_id] = counted
            return
        newer.reads += counted.reads
        newer.last_read = max(newer.last_read, counted.last_read)
        if newer.write_id == counted.write_id:
            newer.reads_of_write += counted.reads_of_write

    async def close(self) -> None:
        """Write what is held (the Keychain closes its pool next)."""
        if self._flusher is not None and not self._flusher.done():
            if self._sleeping:
                self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
        await self.flush()

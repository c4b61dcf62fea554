"""The execution-events agent (warm on start, purge on finish) and the leader-only maintenance timer."""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Awaitable, Callable, TypeVar

from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential_jitter

from .app import app, runtime, settings
from .topics import execution_events, send_dead_letter
from .warm import DATABASE_DOWN, BatchResult, DeadLetter, Record

log = logging.getLogger(__name__)
T = TypeVar("T")



@app.agent(execution_events)
async def executions(stream):
    await runtime.ready()
    async for events in stream.noack_take(settings.warm_batch_size, within=settings.warm_batch_seconds):
        records = [
            Record(e.message.key, e.message.value, e.message.topic, e.message.partition, e.message.offset)
            for e in events
        ]
        result = await handle_durably(records)
        for dead in result.dead:
            record = dead.record
            source = f"{record.topic}/{record.partition}/{record.offset}"
            await send_dead_letter(record.key, record.value, dead.reason, dead.detail, {"source": source})
        # Only now, with rows written (durably) and dead letters acknowledged by the broker, may offsets commit.
        for event in events:
            await stream.ack(event)
        log.info(
            "batch: %d events, %d started, %d finished, %d ignored, %d rows written, %d purged, %d declarations "
            "skipped, %d dead-lettered", len(records), result.started, result.finished, result.ignored,
            result.rows_written, result.rows_purged, result.skipped, len(result.dead),
        )


async def handle_durably_with(work: Callable[[], Awaitable[T]]) -> T:
    """Run `work` until the database takes it: an outage holds the stream (in order) instead of losing events."""
    retrying = AsyncRetrying(
        retry=retry_if_exception_type(DATABASE_DOWN), wait=wait_exponential_jitter(multiplier=0.1, max=5), reraise=True
    )
    async for attempt in retrying:
        with attempt:
            if attempt.retry_state.attempt_number > 1:
                log.warning("database unavailable; retrying (attempt %d)", attempt.retry_state.attempt_number)
            return await work()
    raise AssertionError("unreachable")


async def handle_durably(records: list[Record]) -> BatchResult:
    try:
        return await handle_durably_with(lambda: runtime.warmer.handle(records))
    except Exception as exc:  # a bug, not bad input: keep every event, in the DLQ, and keep the stream going
        log.exception("batch failed; dead-lettering its %d events", len(records))
        return BatchResult(dead=[DeadLetter(r, "internal_error", type(exc).__name__) for r in records])


@app.timer(interval=settings.sweep_interval_seconds, on_leader=True)
async def maintain() -> None:
    """Leader only: delete expired rows, and fetch again the global credentials in use that are about to expire."""
    await runtime.ready()
    swept = await runtime.keychain.sweep()
    runtime.last_sweep = {"at": datetime.now(timezone.utc).isoformat(), "rows": swept}
    log.info("sweep: %d expired rows deleted", swept)
    refreshed = await runtime.warmer.refresh_globals()
    if refreshed:
        log.info("keep-warm: %d global rows refreshed", refreshed)

"""The one durable consume loop, for every stream the worker consumes (the execution events, the rotation notices).
No faust here: the loop takes its batches, its acknowledgement and its dead-letter sender as arguments (faust's
wiring in streams/agents.py, aiokafka's in streams/consumer.py), so it is tested on its own (tests/test_durable.py)."""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any, AsyncIterator, Awaitable, Callable

from . import metrics
from .batches import DeadLetter, Handled, Record, handle_batch

log = logging.getLogger(__name__)

# (key, value, reason, detail, headers) -> whether the broker took it
SendDeadLetter = Callable[[bytes | None, bytes | None, str, str, dict[str, str]], Awaitable[bool]]
DEAD_LETTER_RETRY_INITIAL_SECONDS = 0.1  # jittered, doubling, up to DEAD_LETTER_RETRY_MAX_SECONDS
DEAD_LETTER_RETRY_MAX_SECONDS = 5.0


class HeldForDeadLetters:
    """How many batches are held because the broker has not taken their dead letters yet (/readyz, the gauge)."""

    batches = 0

    @classmethod
    def change(cls, by: int) -> None:
        cls.batches += by
        metrics.BATCHES_HELD_FOR_DEAD_LETTERS.set(cls.batches)


async def deliver_dead_letters(dead: list[DeadLetter], send_dead_letter: SendDeadLetter) -> None:
    """Every dead letter of a batch, taken by the broker: those it refused are sent again, with backoff, for as long
    as it takes, as a database outage holds a batch. Until then the batch is not acknowledged (its offsets are not
    committed): a record whose dead letter was refused is never lost."""
    pending, delay, held = list(dead), DEAD_LETTER_RETRY_INITIAL_SECONDS, False
    try:
        while pending:
            pending = [d for d in pending if not await send_dead_letter(
                d.record.key, d.record.value, d.reason, d.detail, {"source": d.record.source})]
            if not pending:
                return
            if not held:
                held = True
                HeldForDeadLetters.change(+1)
            wait = random.uniform(delay / 2, delay)
            log.warning("%d dead letter(s) not taken by the broker: their batch is held, sent again in %.2fs",
                        len(pending), wait)
            await asyncio.sleep(wait)
            delay = min(delay * 2, DEAD_LETTER_RETRY_MAX_SECONDS)
    finally:
        if held:
            HeldForDeadLetters.change(-1)


async def consume_durably(
    batches: AsyncIterator[tuple[list[Record], Any]],
    acknowledge: Callable[[Any], Awaitable[None]],
    what: str,
    handle: Callable[[list[Record], Callable[[], None]], Awaitable[Handled]],
    send_dead_letter: SendDeadLetter,
    in_flight: int = 1,
) -> None:
    """The one way a batch is consumed: handled (held through database outages), its dead letters sent and
    acknowledged by the broker (held, and sent again, while the broker refuses them), and only then its offsets
    acknowledged. `batches` yields each batch's records with
    the token its source acknowledges it by (`acknowledge`): a faust agent's events (`faust_events`) or aiokafka's offsets
    (streams/consumer.py).

    `in_flight`: batches handled at once. The next batch starts once the earlier ones are done or waiting on
    something other than this process (the handler calls its second argument when it starts waiting for Secret
    Manager or for its write): events that arrive during a fetch are warmed meanwhile instead of queueing behind it,
    a burst's next batch is planned while the database writes the previous one, and a burst that keeps the process
    busy is still handled a full batch at a time. Offsets acknowledged out of order are committed only up to the
    first one still in flight (the source keeps the gaps); every handler is idempotent and fenced, so a batch handled
    beside an earlier one loses nothing and writes nothing stale."""
    slots = asyncio.Semaphore(in_flight)
    free = asyncio.Event()  # no batch is keeping this process busy: the next one may start
    free.set()
    running: set[asyncio.Future[None]] = set()
    failed: list[BaseException] = []

    async def consume(records: list[Record], token: Any) -> None:
        try:
            result = await handle_batch(records, lambda batch: handle(batch, free.set))
            await deliver_dead_letters(result.dead, send_dead_letter)
            await acknowledge(token)  # rows written durably, dead letters taken by the broker: offsets may commit
            log.log(logging.INFO if result.dead or _work_done(result) else logging.DEBUG, "batch: %d %s, %s",
                    len(records), what, result.summary())
        finally:
            free.set()
            slots.release()

    def done(task: asyncio.Future[None]) -> None:
        running.discard(task)
        if not task.cancelled() and task.exception() is not None:
            failed.append(task.exception())

    try:
        async for records, token in batches:
            await slots.acquire()
            await free.wait()
            free.clear()
            if failed:  # a batch failed past its own handling (not the database, not bad input): the loop stops
                raise failed[0]
            task = asyncio.ensure_future(consume(records, token))
            running.add(task)
            task.add_done_callback(done)
        await asyncio.gather(*running, return_exceptions=True)  # the source ended (stopping): let them finish
    finally:  # cancelled: batches not finished are not acknowledged, and come again to whoever consumes next
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)


def _work_done(result: Handled) -> bool:
    """A batch that only held records to ignore (NoETL's step records) logs at DEBUG: they are most of the stream."""
    return any(getattr(result, count, 0) for count in ("started", "finished", "applied"))

"""The one durable consume loop on its own (no faust, no broker: the fast tier): a batch is acknowledged only after
it was handled and its dead letters were taken; a database outage holds the batch instead of losing it; a bug
dead-letters its batch and the stream goes on."""

from dataclasses import dataclass, field

from keychain.errors import KeychainUnavailable
from streams.batches import DeadLetter, Record
from streams.durable import consume_durably


@dataclass
class Result:
    dead: list[DeadLetter] = field(default_factory=list)
    handled: int = 0

    def summary(self) -> str:
        return f"{self.handled} handled"


class Journal:
    """What the loop did, in order."""

    def __init__(self):
        self.steps: list[tuple] = []

    async def acknowledge(self, token) -> None:
        self.steps.append(("ack", token))

    async def send_dead_letter(self, key, value, reason, detail, headers) -> bool:
        self.steps.append(("dead", value, reason))
        return True


async def batches(*groups):
    for token, values in enumerate(groups):
        yield [Record(b"k", v, "events", 0, i) for i, v in enumerate(values)], token


async def test_a_bad_record_is_dead_lettered_before_its_batch_is_acknowledged():
    journal = Journal()

    async def handle(records, _on_wait):
        result = Result()
        for record in records:
            if record.value == b"bad":
                result.dead.append(DeadLetter(record, "invalid_event", "not JSON"))
            else:
                result.handled += 1
        return result

    await consume_durably(batches([b"good", b"bad", b"good"], [b"good"]), journal.acknowledge, "events", handle,
                          journal.send_dead_letter)
    assert journal.steps == [("dead", b"bad", "invalid_event"), ("ack", 0), ("ack", 1)]


async def test_a_database_outage_holds_the_batch_until_it_is_written():
    journal = Journal()
    attempts = []

    async def handle(records, _on_wait):
        attempts.append(len(records))
        if len(attempts) < 3:
            raise KeychainUnavailable("down")
        journal.steps.append(("written", len(records)))
        return Result(handled=len(records))

    await consume_durably(batches([b"a", b"b"]), journal.acknowledge, "events", handle, journal.send_dead_letter)
    assert attempts == [2, 2, 2]  # the whole batch, again, until the database took it
    assert journal.steps == [("written", 2), ("ack", 0)]


async def test_a_bug_dead_letters_its_batch_and_the_stream_goes_on():
    journal = Journal()

    async def handle(records, _on_wait):
        if records[0].value == b"boom":
            raise ZeroDivisionError("a bug")
        return Result(handled=len(records))

    await consume_durably(batches([b"boom", b"x"], [b"fine"]), journal.acknowledge, "events", handle,
                          journal.send_dead_letter)
    assert journal.steps == [("dead", b"boom", "internal_error"), ("dead", b"x", "internal_error"), ("ack", 0),
                             ("ack", 1)]


async def test_batches_in_flight_are_all_acknowledged_and_none_twice():
    journal = Journal()

    async def handle(records, on_wait):
        on_wait()  # waiting on something else than this process: the next batch may start
        return Result(handled=len(records))

    await consume_durably(batches(*[[b"v"]] * 20), journal.acknowledge, "events", handle, journal.send_dead_letter,
                          in_flight=4)
    assert sorted(token for _, token in journal.steps) == list(range(20))


async def test_a_dead_letter_the_broker_refuses_holds_its_batch_until_it_is_taken(monkeypatch):
    """The broker refuses the dead letter twice: the batch is not acknowledged (its offsets are not committed, so the
    record is never lost), the hold is visible (/readyz, the gauge), and once the broker takes it the batch is
    acknowledged, once."""
    import streams.durable as durable
    from streams import metrics

    monkeypatch.setattr(durable, "DEAD_LETTER_RETRY_INITIAL_SECONDS", 0.01)
    journal = Journal()
    refusals = []
    held_seen = []

    async def send_dead_letter(key, value, reason, detail, headers) -> bool:
        held_seen.append((durable.HeldForDeadLetters.batches, metrics.BATCHES_HELD_FOR_DEAD_LETTERS._value.get()))
        if len(refusals) < 2:
            refusals.append(value)
            return False
        journal.steps.append(("dead", value, reason))
        return True

    async def handle(records, _on_wait):
        return Result([DeadLetter(r, "invalid_event", "not JSON") for r in records if r.value == b"bad"])

    await consume_durably(batches([b"bad", b"good"], [b"good"]), journal.acknowledge, "events", handle,
                          send_dead_letter)
    assert refusals == [b"bad", b"bad"]
    assert journal.steps == [("dead", b"bad", "invalid_event"), ("ack", 0), ("ack", 1)]
    assert held_seen == [(0, 0), (1, 1), (1, 1)]  # held from the first refusal until it was taken
    assert durable.HeldForDeadLetters.batches == 0 and metrics.BATCHES_HELD_FOR_DEAD_LETTERS._value.get() == 0

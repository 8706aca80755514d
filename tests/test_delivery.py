"""klime._delivery: splitting to sender limits, 413 halving, the books, callbacks."""

from __future__ import annotations

from typing import List, Sequence

from conftest import Recorder
from klime import SendError
from klime._deadline import Deadline
from klime._delivery import KEEP_UNSENT, Delivery
from klime._events import encode_track
from klime.senders.base import Sender, SendResult


class ScriptedSender(Sender):
    """A sender whose answers are a function of the batch (a fake WHERE, for unit tests)."""

    def __init__(self, answer, max_events=100, max_bytes=10 * 1024 * 1024):
        self.answer = answer
        self.max_batch_events = max_events
        self.max_batch_bytes = max_bytes
        self.batches: List[Sequence[bytes]] = []

    def send(self, events, deadline):
        self.batches.append(list(events))
        return self.answer(events)


def evs(n):
    return [encode_track("E", {"i": i}, "u", None) for i in range(n)]


def ok(events):
    return SendResult(None, None, (), 1, 0)


def test_split_to_the_senders_limits():
    sender = ScriptedSender(ok, max_events=3)
    outcome = Delivery(sender).send(evs(8), Deadline())
    assert [len(b) for b in sender.batches] == [3, 3, 2] and outcome.sent == 8


def test_413_halves_down_to_single_events():
    too_big = {2}  # event #2 alone is still too large

    def answer(events):
        if len(events) > 1 or any(b'"i":2' in e for e in events if len(events) == 1 and 2 in too_big):
            return SendResult(
                None, SendError("too large", 413), tuple(range(len(events))), 1, 0, too_large=True
            )
        return ok(events)

    on_error = Recorder()
    delivery = Delivery(ScriptedSender(answer), on_error=on_error)
    outcome = delivery.send(evs(4), Deadline())
    assert outcome.sent == 3 and outcome.failed == 1
    assert [e["properties"]["i"] for e in on_error.events] == [2]
    assert delivery.counters()["failed"] == 1


def test_partial_failure_counts_and_reports_only_failed():
    def answer(events):
        return SendResult(None, SendError("some rejected", 200), (1,), 1, 0)

    on_error = Recorder()
    delivery = Delivery(ScriptedSender(answer), on_error=on_error)
    outcome = delivery.send(evs(3), Deadline())
    assert (outcome.sent, outcome.failed) == (2, 1)
    assert [e["properties"]["i"] for e in on_error.events] == [1]


def test_a_sender_that_raises_fails_the_batch():
    def answer(events):
        raise ValueError("bug in a custom sender")

    on_error = Recorder()
    delivery = Delivery(ScriptedSender(answer), on_error=on_error)
    outcome = delivery.send(evs(2), Deadline())
    assert outcome.failed == 2 and len(on_error.events) == 2


def test_settle_refused_means_nothing_is_counted():
    delivery = Delivery(ScriptedSender(ok))
    outcome = delivery.send(evs(2), Deadline(), settle=lambda outcome: False)
    assert outcome.sent == 0 and delivery.counters()["sent"] == 0


def test_keep_unsent_returns_what_the_deadline_stopped():
    def answer(events):
        return SendResult(
            None,
            SendError("deadline", retryable=True),
            tuple(range(len(events))),
            0,
            0,
            deadline_reached=True,
        )

    on_error = Recorder()
    delivery = Delivery(ScriptedSender(answer), on_error=on_error)
    outcome = delivery.send(evs(2), Deadline(), keep=KEEP_UNSENT)
    assert len(outcome.unsent) == 2 and outcome.failed == 0 and on_error.calls == []
    assert delivery.counters()["failed"] == 0


def test_drop_and_fail_are_counted_and_reported():
    on_error = Recorder()
    delivery = Delivery(ScriptedSender(ok), on_error=on_error)
    delivery.drop(evs(2), "queue full")
    delivery.fail(evs(1), "abandoned")
    counters = delivery.counters()
    assert counters["dropped"] == 2 and counters["failed"] == 1
    assert len(on_error.calls) == 2 and on_error.calls[0][0].message == "queue full"

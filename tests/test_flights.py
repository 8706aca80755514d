"""The in-flight machinery (src/klime/transports/_flights.py): the book-keeping of batches
in the air and deferred, and of the threads that fly them (the limit's own rules:
tests/test_limit.py)."""

from __future__ import annotations

import threading

from klime._retry import Retry
from klime.senders.base import ATTEMPT_OK, ATTEMPT_TRANSIENT
from klime.transports._flights import AdaptiveLimit, Batch, Flights

SLOW = 0.05  # a 50 ms round trip
FAST = 0.0002  # loopback


def grown(limit: AdaptiveLimit, steps: int, *, seconds: float = SLOW, backlog: int = 100) -> AdaptiveLimit:
    """Feed ``steps`` accepted requests, each with the whole window in use."""
    for _ in range(steps):
        limit.observe(ATTEMPT_OK, seconds, cpu=0.0003, backlog=backlog, in_flight=limit.limit)
    return limit


# ---------------------------------------------------------------------------------------
# Flights: batches in the air and deferred


def flights(ceiling: int = 4) -> Flights:
    return Flights(threading.Lock(), ceiling=ceiling, name="test-flights")


def test_a_batch_lands_once():
    f = flights()
    batch = f.mark_sending_locked(Batch(0, [b"a", b"b"]))
    assert f.held_locked() == 2
    assert f.settle_locked(batch, [], Retry(1), None) is True
    assert f.settle_locked(batch, [b"a"], Retry(1), None) is False  # settled already: nothing changes
    assert f.held_locked() == 0 and not f.deferred


def test_deferred_events_wait_first_in_line_with_their_attempts():
    f = flights()
    batch = f.mark_sending_locked(Batch(7, [b"a", b"b", b"c"]))
    f.settle_locked(batch, [b"b", b"c"], Retry(2), "HTTP 503")
    assert f.held_locked() == 2
    again = f.take_deferred_locked()
    assert again is not None and again.events == [b"b", b"c"] and again.attempts == 2
    assert again.start == 7  # still counts as holding events from sequence number 7 on
    assert not f.settled_locked(8) and f.settled_locked(7)


def test_deferred_batches_wait_for_room_under_the_limit():
    f = flights()
    f.limit.limit = 1
    first = f.mark_sending_locked(Batch(0, [b"a"]))
    second = f.mark_sending_locked(Batch(1, [b"b"]))  # the transport boarded it while the limit was higher
    f.settle_locked(second, [b"b"], Retry(1), None)
    assert f.take_deferred_locked() is None  # one is in the air: the limit is full
    f.settle_locked(first, [], Retry(1), None)
    again = f.take_deferred_locked()
    assert again is not None and again.events == [b"b"]


def test_a_transient_failure_beyond_the_limit_asks_to_defer():
    f = flights(ceiling=8)
    grown(f.limit, 3)
    assert f.limit.limit == 8
    for n in range(8):
        f.mark_sending_locked(Batch(n, [b"x"]))
    answers = []
    for batch in list(f.flying):
        answers.append(f.pace_locked(ATTEMPT_TRANSIENT, SLOW, 0.0003, backlog=10))
        if not answers[-1]:
            f.settle_locked(batch, batch.events, Retry(1), None)  # what the transport does: defer it
    # the limit halves at each failure; only what fits under it keeps retrying
    assert answers.count(True) == 1 and f.limit.limit == 1
    assert len(f.flying) == 1 and len(f.deferred) == 7


def test_unsettled_counts_events_below_a_sequence_number():
    f = flights()
    f.mark_sending_locked(Batch(0, [b"a", b"b", b"c"]))
    f.mark_sending_locked(Batch(3, [b"d", b"e"]))
    assert f.unsettled_locked(2) == 2
    assert f.unsettled_locked(4) == 4
    assert f.unsettled_locked(100) == 5


def test_abandon_hands_back_everything_once():
    f = flights()
    a = f.mark_sending_locked(Batch(0, [b"a"]))
    b = f.mark_sending_locked(Batch(1, [b"b"]))
    f.settle_locked(b, [b"b"], Retry(1), None)
    abandoned, parked = f.abandon_locked()
    assert abandoned == [a] and [p.events for p in parked] == [[b"b"]]
    assert f.settle_locked(a, [], Retry(1), None) is False  # its flight's outcome is no longer counted
    assert f.held_locked() == 0


def test_threads_wanted_fills_the_room_once_and_not_while_one_is_idle():
    f = flights(ceiling=8)
    f.limit.limit = 6
    f.mark_sending_locked(Batch(0, [b"x"]))
    f.threads.append(threading.current_thread())
    assert f.threads_wanted_locked(2) == 2  # only 2 batches waiting
    f.unwanted_locked(2)
    assert f.threads_wanted_locked(10) == 5  # room for 5 more in the air
    # counted at once: another thread deciding now does not start them again
    assert f.threads_wanted_locked(10) == 0
    f.unwanted_locked(5)
    f.idle = 1
    assert f.threads_wanted_locked(10) == 0  # the idle one is woken instead
    f.idle = 0
    f.no_threads = True
    assert f.threads_wanted_locked(10) == 0


def test_concurrent_spawns_never_start_more_threads_than_the_limit():
    f = flights(ceiling=8)
    f.limit.limit = 8
    started = threading.Event()
    release = threading.Event()

    def worker() -> None:
        started.set()
        release.wait(5)
        with f.lock:
            f.retire_locked(threading.current_thread(), lower_limit=False)

    with f.lock:  # two sender threads decide, one after the other, before either starts any
        first = f.threads_wanted_locked(8)
        second = f.threads_wanted_locked(8)
    assert (first, second) == (8, 0)
    for _ in range(first):
        f.spawn(worker)
    try:
        assert started.wait(5) and len(f.threads) == 8 and f.starting == 0
    finally:
        release.set()

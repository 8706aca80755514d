"""The in-flight machinery (src/klime/transports/_flights.py): the adaptive limit's rules,
one by one and as properties, and the book-keeping of batches in the air and deferred."""

from __future__ import annotations

import threading

from hypothesis import given, settings
from hypothesis import strategies as st

from klime._retry import Retry
from klime.senders.base import ATTEMPT_OK, ATTEMPT_REJECTED, ATTEMPT_TRANSIENT
from klime.transports._flights import SLOW_ROUND_TRIP_S, AdaptiveLimit, Batch, Flights
from klime.transports._limit import CPU_BOUND_SHARE, PRESSED_ROUND_TRIP_S, CpuGauge

SLOW = 0.05  # a 50 ms round trip
FAST = 0.0002  # loopback


def grown(limit: AdaptiveLimit, steps: int, *, seconds: float = SLOW, backlog: int = 100) -> AdaptiveLimit:
    """Feed ``steps`` accepted requests, each with the whole window in use."""
    for _ in range(steps):
        limit.observe(ATTEMPT_OK, seconds, backlog=backlog, in_flight=limit.limit)
    return limit


def test_starts_with_one_request_at_a_time():
    assert AdaptiveLimit(32).limit == 1


def test_grows_under_a_backlog_when_round_trips_are_slow():
    limit = grown(AdaptiveLimit(32), 1)
    assert limit.limit == 2  # at most doubling per accepted request
    grown(limit, 2)
    assert limit.limit == 8
    grown(limit, 5)
    assert limit.limit == 32  # the ceiling


def test_a_fast_best_round_trip_means_a_fast_link_whatever_the_slow_moments():
    limit = AdaptiveLimit(32)
    limit.observe(ATTEMPT_OK, FAST, backlog=100, in_flight=1)  # a busy local server, at best fast
    for _ in range(20):
        limit.observe(ATTEMPT_OK, 0.008, backlog=100, in_flight=limit.limit)
    assert limit.limit == 1


def gauge(share: float) -> CpuGauge:
    """A CpuGauge on fake clocks: the process uses ``share`` of a core, 1 ms per look."""
    ticks = [0]

    def wall() -> float:
        ticks[0] += 1
        return ticks[0] * 0.001

    return CpuGauge(clock=wall, cpu_clock=lambda: ticks[0] * 0.001 * share)


def test_a_nearby_endpoint_gets_more_in_flight_only_when_the_queue_is_half_full():
    near = 0.004  # the same region: faster than SLOW_ROUND_TRIP_S, slower than PRESSED_ROUND_TRIP_S
    assert PRESSED_ROUND_TRIP_S < near < SLOW_ROUND_TRIP_S
    limit = AdaptiveLimit(32, cpu=gauge(0.3))
    for _ in range(5):
        limit.observe(ATTEMPT_OK, near, backlog=100, in_flight=limit.limit)
    assert limit.limit == 1
    for _ in range(3):
        limit.observe(ATTEMPT_OK, near, backlog=100, in_flight=limit.limit, drops_near=True)
    assert limit.limit == 8
    loopback = AdaptiveLimit(32, cpu=gauge(0.3))
    for _ in range(5):
        loopback.observe(ATTEMPT_OK, FAST, backlog=100, in_flight=loopback.limit, drops_near=True)
    assert loopback.limit == 1  # drops_near, but a round trip this short is the CPU's, not the wire's


def test_a_cpu_bound_process_gets_no_more_in_flight_from_a_few_milliseconds():
    # a tight loop of track calls keeps a core busy: a 4 ms round trip is the GIL's wait
    limit = AdaptiveLimit(32, cpu=gauge(CPU_BOUND_SHARE + 0.1))
    for _ in range(10):
        limit.observe(ATTEMPT_OK, 0.004, backlog=100, in_flight=limit.limit, drops_near=True)
    assert limit.limit == 1
    far = AdaptiveLimit(32, cpu=gauge(CPU_BOUND_SHARE + 0.1))
    grown(far, 1)  # round trips of 50 ms are the wire's, whatever the CPU
    assert far.limit == 2


def test_the_cpu_gauge_measures_between_looks():
    assert gauge(0.5).spare() and gauge(0.79).spare()
    assert not gauge(1.0).spare()
    assert not gauge(1.8).spare()  # two threads on two cores


def test_grows_toward_what_the_backlog_needs_not_beyond():
    limit = AdaptiveLimit(32)
    for _ in range(10):
        # 3 batches in the air, 2 waiting: 5 are enough
        limit.observe(ATTEMPT_OK, SLOW, backlog=2, in_flight=min(limit.limit, 3))
    assert limit.limit <= 5


def test_does_not_grow_on_fast_round_trips():
    limit = grown(AdaptiveLimit(32), 50, seconds=FAST)
    assert limit.limit == 1
    assert not limit.slow()
    assert FAST < SLOW_ROUND_TRIP_S <= SLOW


def test_does_not_grow_without_a_backlog():
    limit = grown(AdaptiveLimit(32), 50, backlog=0)
    assert limit.limit == 1


def test_does_not_grow_while_the_window_is_not_in_use():
    limit = grown(AdaptiveLimit(32), 3)
    at = limit.limit
    for _ in range(3):
        limit.observe(ATTEMPT_OK, SLOW, backlog=100, in_flight=1)
    assert limit.limit <= at


def test_halves_on_every_transient_failure_down_to_one():
    limit = grown(AdaptiveLimit(32), 10)
    assert limit.limit == 32
    seen = []
    for _ in range(6):
        limit.observe(ATTEMPT_TRANSIENT, 10.0, backlog=100, in_flight=32)
        seen.append(limit.limit)
    assert seen == [16, 8, 4, 2, 1, 1]


def test_permanent_rejections_say_nothing_about_load():
    limit = grown(AdaptiveLimit(32), 3)
    at = limit.limit
    limit.observe(ATTEMPT_REJECTED, SLOW, backlog=100, in_flight=at)
    assert limit.limit == at


def test_a_burst_that_slows_the_server_does_not_raise_the_base():
    limit = grown(AdaptiveLimit(32), 2, seconds=0.006)  # base: 6 ms
    for _ in range(300):  # the server now answers in 30 ms because of our own load
        limit.observe(ATTEMPT_OK, 0.03, backlog=100, in_flight=limit.limit)
    assert limit.best() < 0.012  # still near 6 ms: the slowness is not taken for the route
    assert limit.limit == 1  # and what more in flight only slowed was given back


def test_a_route_that_got_slower_for_good_is_learnt():
    limit = grown(AdaptiveLimit(32), 2, seconds=0.006)
    for _ in range(64 * 25):
        limit.observe(ATTEMPT_OK, 0.05, backlog=0, in_flight=1)
    assert limit.best() == 0.05


def test_stops_growing_when_round_trips_grow_past_twice_the_best():
    limit = grown(AdaptiveLimit(32), 2)  # best: 50 ms
    at = limit.limit
    grown(limit, 5, seconds=3 * SLOW)  # the server slows down under the load
    assert limit.limit == at
    grown(limit, 1, seconds=1.5 * SLOW)  # within twice the best: growth again
    assert limit.limit > at


def test_an_unused_limit_falls_back_to_what_is_used():
    limit = grown(AdaptiveLimit(32), 10)
    assert limit.limit == 32
    for _ in range(200):  # a steady load that needs 10 in the air
        limit.observe(ATTEMPT_OK, SLOW, backlog=0, in_flight=10)
    assert limit.limit == 15  # what was used, plus half as much again


def test_relax_follows_the_pool_down_but_never_below_one():
    limit = grown(AdaptiveLimit(32), 4)
    limit.lower_to(3)
    assert limit.limit == 3
    limit.lower_to(0)
    assert limit.limit == 1


outcomes = st.sampled_from([ATTEMPT_OK, ATTEMPT_TRANSIENT, ATTEMPT_REJECTED])


@settings(max_examples=300, deadline=None)
@given(
    ceiling=st.integers(1, 64),
    steps=st.lists(
        st.tuples(outcomes, st.floats(0, 2), st.integers(0, 200), st.integers(0, 80)), max_size=200
    ),
)
def test_the_limit_always_stays_between_one_and_the_ceiling(ceiling, steps):
    limit = AdaptiveLimit(ceiling)
    for outcome, seconds, backlog, in_flight in steps:
        before = limit.limit
        limit.observe(outcome, seconds, backlog=backlog, in_flight=in_flight)
        assert 1 <= limit.limit <= ceiling
        if outcome == ATTEMPT_TRANSIENT:
            assert limit.limit == max(1, before // 2)
        if seconds < SLOW_ROUND_TRIP_S or backlog == 0:
            assert limit.limit <= before  # no evidence that more in the air would help


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
        answers.append(f.pace_locked(ATTEMPT_TRANSIENT, SLOW, backlog=10))
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


def test_a_known_set_of_batches_jumps_to_what_it_needs():
    limit = AdaptiveLimit(32, grow_at_once=True)
    limit.observe(ATTEMPT_OK, SLOW, backlog=12, in_flight=1)
    assert limit.limit == 13  # the first accepted request opens it to the whole set


def test_a_warm_flush_opens_to_its_batches_at_once_when_round_trips_were_slow():
    limit = AdaptiveLimit(32, grow_at_once=True)
    limit.allow_all_at_once(13)
    assert limit.limit == 1  # nothing known yet: one batch goes first and decides
    limit.observe(ATTEMPT_OK, SLOW, backlog=0, in_flight=1)
    limit.allow_all_at_once(13)
    assert limit.limit == 13
    limit.allow_all_at_once(100)
    assert limit.limit == 32  # never beyond the ceiling


def test_no_opening_after_a_failure_or_on_a_fast_link():
    fast = AdaptiveLimit(32, grow_at_once=True)
    fast.observe(ATTEMPT_OK, FAST, backlog=0, in_flight=1)
    fast.allow_all_at_once(13)
    assert fast.limit == 1
    failing = AdaptiveLimit(32, grow_at_once=True)
    failing.observe(ATTEMPT_OK, SLOW, backlog=0, in_flight=1)
    failing.observe(ATTEMPT_TRANSIENT, SLOW, backlog=0, in_flight=1)
    failing.allow_all_at_once(13)
    assert failing.limit == 1


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

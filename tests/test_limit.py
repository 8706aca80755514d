"""The concurrency limit (src/klime/transports/_limit.py): its rules one by one, on a fake
clock, and as properties."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from klime.senders.base import ATTEMPT_OK, ATTEMPT_REJECTED, ATTEMPT_TRANSIENT
from klime.transports._limit import (
    _KNEE_WINDOW,
    GAIN_SHARE,
    HOLD_SHARE,
    AdaptiveLimit,
    carried_share,
    off_cpu_share,
)

SLOW = 0.05  # a 50 ms round trip: the network's and the server's
CPU = 0.0003  # what one request costs its thread (about 300 µs, measured here)
LOOPBACK = 0.0006  # a loopback round trip: mostly that CPU


class Clock:
    """A monotonic clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def new_limit(ceiling: int = 32, **options: object) -> tuple[AdaptiveLimit, Clock]:
    clock = Clock()
    return AdaptiveLimit(ceiling, clock=clock, **options), clock  # type: ignore[arg-type]


def answer(
    limit: AdaptiveLimit,
    clock: Clock,
    seconds: float = SLOW,
    *,
    cpu: float = CPU,
    backlog: int = 100,
    in_flight: int | None = None,
    drops_near: bool = True,
) -> None:
    """One accepted answer ``seconds`` after the previous one (by default a full window and
    a standing backlog that fills the queue: demand enough, see the arrival tests)."""
    clock.now += seconds
    flying = limit.limit if in_flight is None else in_flight
    limit.observe(ATTEMPT_OK, seconds, cpu=cpu, backlog=backlog, in_flight=flying, drops_near=drops_near)


def answers(limit: AdaptiveLimit, clock: Clock, n: int, seconds: float = SLOW, **kw: object) -> AdaptiveLimit:
    for _ in range(n):
        answer(limit, clock, seconds, **kw)  # type: ignore[arg-type]
    return limit


# ----------------------------------------------------------------------------- the two shares


def test_carried_share_is_littles_law_on_in_flight_and_round_trips():
    assert carried_share(1, 0.5, 0.05) == 1.0  # one request alone carries its own share
    assert carried_share(4, 0.05, 0.05) == pytest.approx(1.0)  # round trips do not grow: all carried
    assert carried_share(4, 0.2, 0.05) == pytest.approx(0.0)  # they grow with N: nothing carried
    assert carried_share(2, 0.075, 0.05) == pytest.approx(1 / 3)


def test_off_cpu_share_is_what_other_threads_could_overlap():
    assert off_cpu_share(0.05, 0.05, 0.0003) == pytest.approx(0.994)
    assert off_cpu_share(0.0006, 0.0006, 0.0003) == pytest.approx(0.5)
    assert off_cpu_share(0.006, 0.0006, 0.0005) == pytest.approx(0.1 / 6)  # a busy interpreter
    assert off_cpu_share(0.001, 0.0005, 0.0009) == 0.0  # more CPU than the best round trip
    assert HOLD_SHARE < GAIN_SHARE


# ----------------------------------------------------------------------------- growing


def test_starts_with_one_request_at_a_time():
    assert new_limit()[0].limit == 1


def test_grows_under_a_backlog_when_round_trips_are_wire_time():
    limit, clock = new_limit()
    answers(limit, clock, 1)
    assert limit.limit == 2  # at most doubling per accepted request
    answers(limit, clock, 2)
    assert limit.limit == 8
    answers(limit, clock, 5)
    assert limit.limit == 32  # the ceiling


def test_a_request_that_is_mostly_cpu_never_gets_a_second_in_flight():
    # loopback: the best round trip is hardly more than the request's own CPU time; a
    # second thread would only share the interpreter, however long the backlog
    limit, clock = new_limit()
    answers(limit, clock, 200, LOOPBACK, cpu=0.0004, drops_near=True)
    assert limit.limit == 1
    answers(limit, clock, 50, 0.008, cpu=0.0004, drops_near=True)  # slow moments of a fast link
    assert limit.limit == 1


def test_a_busy_interpreter_gives_no_more_turns_to_requests_that_wait_for_it():
    # the application's threads hold the interpreter: a 5 ms endpoint's round trips read
    # 12 ms, more than twice what is off the CPU (5 - 0.5 ms): no growth, queue full or not
    limit, clock = new_limit()
    answer(limit, clock, 0.005, cpu=0.0005, backlog=0)  # the base: 5 ms
    answers(limit, clock, 100, 0.012, cpu=0.0005, drops_near=True)
    assert limit.limit == 1


def test_a_remote_endpoint_grows_busy_interpreter_or_not():
    limit, clock = new_limit()
    answer(limit, clock, SLOW, backlog=0)  # the base: 50 ms
    answers(limit, clock, 5, 0.065)  # 15 ms of it the interpreter's: most is still wire
    assert limit.limit == 32


def test_a_nearby_endpoint_grows_while_arrivals_need_it():
    limit, clock = new_limit()
    near = 0.004  # the same region, an idle interpreter
    # 500 batches a second arrive (10,000 events/s of 20), each 4 ms in the air: 2 needed
    for _ in range(40):
        clock.now += 0.002
        limit.observe(ATTEMPT_OK, near, cpu=CPU, backlog=3, in_flight=limit.limit)
    assert 2 <= limit.limit <= 4


def test_a_backlog_that_one_request_drains_asks_for_nothing():
    # a few batches left from a start, arrivals slow: one request in flight keeps up
    limit, clock = new_limit()
    for _ in range(30):
        clock.now += 1.0  # one answer a second: arrivals near nothing
        limit.observe(ATTEMPT_OK, SLOW, cpu=CPU, backlog=3, in_flight=1)
    assert limit.limit == 1


def test_a_full_queue_is_demand_enough():
    limit, clock = new_limit()
    for _ in range(10):
        clock.now += 1.0  # the arrivals the queue lets be counted are few
        limit.observe(ATTEMPT_OK, SLOW, cpu=CPU, backlog=3, in_flight=limit.limit, drops_near=True)
    assert limit.limit >= 3


def test_grows_toward_what_the_backlog_needs_not_beyond():
    limit, clock = new_limit()
    for _ in range(10):  # 3 batches in the air, 3 waiting: 6 are enough
        answer(limit, clock, backlog=3, in_flight=min(limit.limit, 3))
    assert limit.limit <= 6


def test_does_not_grow_without_a_backlog_or_with_the_window_unused():
    limit, clock = new_limit()
    answers(limit, clock, 50, backlog=0)
    assert limit.limit == 1
    answers(limit, clock, 2)
    at = limit.limit
    answers(limit, clock, 3, in_flight=1)
    assert limit.limit <= at


def test_a_known_set_of_batches_opens_to_what_it_needs_at_once():
    limit, clock = new_limit(grow_at_once=True)
    answer(limit, clock, backlog=12, in_flight=1)
    assert limit.limit == 13


def test_a_warm_flush_opens_at_once_only_when_more_in_flight_paid():
    limit, clock = new_limit(grow_at_once=True)
    limit.allow_all_at_once(13)
    assert limit.limit == 1  # nothing known yet: one batch goes first and decides
    answer(limit, clock, backlog=0, in_flight=1)
    limit.allow_all_at_once(13)
    assert limit.limit == 13
    limit.allow_all_at_once(100)
    assert limit.limit == 32  # never beyond the ceiling

    local, clock = new_limit(grow_at_once=True)
    answer(local, clock, LOOPBACK, backlog=0, in_flight=1, cpu=0.0004)
    local.allow_all_at_once(13)
    assert local.limit == 1  # all CPU: a second would not pay

    failing, clock = new_limit(grow_at_once=True)
    answer(failing, clock, backlog=0, in_flight=1)
    failing.observe(ATTEMPT_TRANSIENT, SLOW, backlog=0, in_flight=1)
    failing.allow_all_at_once(13)
    assert failing.limit == 1


# ----------------------------------------------------------------------------- giving back


def test_halves_on_every_transient_failure_down_to_one():
    limit, clock = new_limit()
    answers(limit, clock, 10)
    assert limit.limit == 32
    seen = []
    for _ in range(6):
        limit.observe(ATTEMPT_TRANSIENT, 10.0, backlog=100, in_flight=32)
        seen.append(limit.limit)
    assert seen == [16, 8, 4, 2, 1, 1]


def test_permanent_rejections_say_nothing_about_load():
    limit, clock = new_limit()
    answers(limit, clock, 3)
    at = limit.limit
    limit.observe(ATTEMPT_REJECTED, SLOW, backlog=100, in_flight=at)
    assert limit.limit == at


def test_a_bottleneck_takes_back_what_it_did_not_carry_and_is_not_probed_again_soon():
    limit, clock = new_limit()
    answer(limit, clock, 0.006, backlog=0)  # the base: 6 ms
    answer(limit, clock, 0.006)  # the limit tries 2
    assert limit.limit == 2
    for _ in range(20):  # the server serialises: two in flight take twice as long each
        answer(limit, clock, 0.012 * limit.limit / 2 + 0.006 * (limit.limit == 1))
    assert limit.limit == 1
    answers(limit, clock, _KNEE_WINDOW // 2, 0.006)  # the knee holds for a while
    assert limit.limit == 1
    answers(limit, clock, _KNEE_WINDOW, 0.006)  # then it probes again
    assert limit.limit >= 2


def test_a_burst_that_slows_the_server_does_not_raise_the_base():
    limit, clock = new_limit()
    answers(limit, clock, 2, 0.006)  # base: 6 ms
    for _ in range(300):  # the server now answers in 30 ms because of our own load
        answer(limit, clock, 0.03)
    assert limit.best() is not None and limit.best() < 0.012  # not taken for the route
    assert limit.limit == 1  # what more in flight only slowed was given back


def test_a_route_that_got_slower_for_good_is_learnt():
    limit, clock = new_limit()
    answers(limit, clock, 2, 0.006)
    answers(limit, clock, 64 * 25, 0.05, backlog=0, in_flight=1)
    assert limit.best() == 0.05


def test_an_unused_limit_falls_back_to_what_is_used():
    limit, clock = new_limit()
    answers(limit, clock, 10)
    assert limit.limit == 32
    answers(limit, clock, 200, backlog=0, in_flight=10)  # a steady load that needs 10
    assert limit.limit == 15  # what was used, plus half as much again


def test_lower_to_follows_the_pool_down_but_never_below_one():
    limit, clock = new_limit()
    answers(limit, clock, 4)
    limit.lower_to(3)
    assert limit.limit == 3
    limit.lower_to(0)
    assert limit.limit == 1


# ----------------------------------------------------------------------------- the lock-free path


def test_the_fast_path_takes_only_answers_that_cannot_grow_the_limit():
    limit, clock = new_limit()
    assert not limit.note_fast_success(ATTEMPT_OK, LOOPBACK, 0.0004)  # nothing known yet
    answer(limit, clock, LOOPBACK, cpu=0.0004, backlog=0)
    assert limit.note_fast_success(ATTEMPT_OK, LOOPBACK, 0.0004)  # all CPU: nothing to decide
    assert not limit.note_fast_success(ATTEMPT_TRANSIENT, LOOPBACK, 0.0004)

    remote, clock = new_limit()
    answer(remote, clock, backlog=0)
    assert not remote.note_fast_success(ATTEMPT_OK, SLOW, CPU)  # a second might pay


# ----------------------------------------------------------------------------- properties

outcomes = st.sampled_from([ATTEMPT_OK, ATTEMPT_TRANSIENT, ATTEMPT_REJECTED])


@settings(max_examples=300, deadline=None)
@given(
    ceiling=st.integers(1, 64),
    steps=st.lists(
        st.tuples(outcomes, st.floats(0, 2), st.floats(0, 0.01), st.integers(0, 200), st.integers(0, 80),
                  st.floats(0, 1)),
        max_size=200,
    ),
)
def test_the_limit_stays_between_one_and_the_ceiling_and_grows_only_on_evidence(ceiling, steps):
    limit, clock = new_limit(ceiling)
    for outcome, seconds, cpu, backlog, in_flight, gap in steps:
        clock.now += gap
        before = limit.limit
        limit.observe(outcome, seconds, cpu=cpu, backlog=backlog, in_flight=in_flight)
        assert 1 <= limit.limit <= ceiling
        if outcome == ATTEMPT_TRANSIENT:
            assert limit.limit == max(1, before // 2)
        if backlog == 0 or in_flight < before or seconds <= 2 * cpu:
            assert limit.limit <= before  # no evidence that more in the air would help

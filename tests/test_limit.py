"""The concurrency limit (src/klime/transports/_limit.py): its rules one by one, and as
properties."""

from __future__ import annotations

from typing import Optional

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


def answer(
    limit: AdaptiveLimit,
    seconds: float = SLOW,
    *,
    cpu: float = CPU,
    backlog: int = 100,
    in_flight: Optional[int] = None,
) -> None:
    """One accepted answer (by default with the whole window in use and a long backlog)."""
    flying = limit.limit if in_flight is None else in_flight
    limit.observe(ATTEMPT_OK, seconds, cpu=cpu, backlog=backlog, in_flight=flying)


def answers(limit: AdaptiveLimit, n: int, seconds: float = SLOW, **kw: object) -> AdaptiveLimit:
    for _ in range(n):
        answer(limit, seconds, **kw)  # type: ignore[arg-type]
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
    assert AdaptiveLimit(32).limit == 1


def test_grows_under_a_backlog_when_round_trips_are_wire_time():
    limit = AdaptiveLimit(32)
    answers(limit, 1)
    assert limit.limit == 2  # at most doubling per accepted request
    answers(limit, 2)
    assert limit.limit == 8
    answers(limit, 5)
    assert limit.limit == 32  # the ceiling


def test_a_request_that_is_mostly_cpu_never_gets_a_second_in_flight():
    # loopback: the best round trip is hardly more than the request's own CPU time; a
    # second thread would only share the interpreter, however long the backlog
    limit = AdaptiveLimit(32)
    answers(limit, 200, LOOPBACK, cpu=0.0004)
    assert limit.limit == 1
    answers(limit, 50, 0.008, cpu=0.0004)  # slow moments of a fast link
    assert limit.limit == 1


def test_a_busy_interpreter_gives_no_more_turns_to_requests_that_wait_for_it():
    # the application's threads hold the interpreter: a 5 ms endpoint's round trips read
    # 12 ms, more than twice what is off the CPU (5 - 0.5 ms): no growth
    limit = AdaptiveLimit(32)
    answer(limit, 0.005, cpu=0.0005, backlog=0)  # the base: 5 ms
    answers(limit, 100, 0.012, cpu=0.0005)
    assert limit.limit == 1


def test_a_remote_endpoint_grows_busy_interpreter_or_not():
    limit = AdaptiveLimit(32)
    answer(limit, SLOW, backlog=0)  # the base: 50 ms
    answers(limit, 5, 0.065)  # 15 ms of it the interpreter's: most is still wire
    assert limit.limit == 32


def test_a_nearby_endpoint_grows_to_what_its_backlog_needs():
    limit = AdaptiveLimit(32)
    for _ in range(40):  # 4 ms, an idle interpreter: 3 batches wait behind each answer
        answer(limit, 0.004, backlog=limit.limit + 2)
    assert limit.limit == 32  # the backlog keeps asking: the ceiling


def test_grows_toward_what_the_backlog_needs_not_beyond():
    limit = AdaptiveLimit(32)
    for _ in range(10):  # 3 batches in the air, 4 waiting: 7 are enough
        answer(limit, backlog=4, in_flight=min(limit.limit, 3))
    assert limit.limit <= 7


def test_does_not_grow_without_a_backlog_or_with_the_window_unused():
    limit = AdaptiveLimit(32)
    answers(limit, 50, backlog=0)
    assert limit.limit == 1
    answers(limit, 2)
    at = limit.limit
    answers(limit, 3, in_flight=1)
    assert limit.limit <= at


def test_a_known_set_of_batches_opens_to_what_it_needs_at_once():
    limit = AdaptiveLimit(32, grow_at_once=True)
    answer(limit, backlog=12, in_flight=1)
    assert limit.limit == 13


def test_a_warm_flush_opens_at_once_only_when_more_in_flight_paid():
    limit = AdaptiveLimit(32, grow_at_once=True)
    limit.allow_all_at_once(13)
    assert limit.limit == 1  # nothing known yet: one batch goes first and decides
    answer(limit, backlog=0, in_flight=1)
    limit.allow_all_at_once(13)
    assert limit.limit == 13
    limit.allow_all_at_once(100)
    assert limit.limit == 32  # never beyond the ceiling

    local = AdaptiveLimit(32, grow_at_once=True)
    answer(local, LOOPBACK, backlog=0, in_flight=1, cpu=0.0004)
    local.allow_all_at_once(13)
    assert local.limit == 1  # all CPU: a second would not pay

    failing = AdaptiveLimit(32, grow_at_once=True)
    answer(failing, backlog=0, in_flight=1)
    failing.observe(ATTEMPT_TRANSIENT, SLOW, backlog=0, in_flight=1)
    failing.allow_all_at_once(13)
    assert failing.limit == 1


# ----------------------------------------------------------------------------- giving back


def test_halves_on_every_transient_failure_down_to_one():
    limit = answers(AdaptiveLimit(32), 10)
    assert limit.limit == 32
    seen = []
    for _ in range(6):
        limit.observe(ATTEMPT_TRANSIENT, 10.0, backlog=100, in_flight=32)
        seen.append(limit.limit)
    assert seen == [16, 8, 4, 2, 1, 1]


def test_permanent_rejections_say_nothing_about_load():
    limit = answers(AdaptiveLimit(32), 3)
    at = limit.limit
    limit.observe(ATTEMPT_REJECTED, SLOW, backlog=100, in_flight=at)
    assert limit.limit == at


def test_a_bottleneck_takes_back_what_it_did_not_carry_and_is_not_probed_again_soon():
    limit = AdaptiveLimit(32)
    answer(limit, 0.006, backlog=0)  # the base: 6 ms
    answer(limit, 0.006)  # the limit tries 2
    assert limit.limit == 2
    for _ in range(20):  # the server serialises: each request takes 6 ms per one in the air
        answer(limit, 0.006 * limit.limit)
    assert limit.limit == 1
    answers(limit, _KNEE_WINDOW // 2, 0.006)  # the knee holds for a while
    assert limit.limit == 1
    answers(limit, _KNEE_WINDOW, 0.006)  # then it probes again
    assert limit.limit >= 2


def test_a_burst_that_slows_the_server_does_not_raise_the_base():
    limit = answers(AdaptiveLimit(32), 2, 0.006)  # base: 6 ms
    answers(limit, 300, 0.03)  # the server now answers in 30 ms because of our own load
    best = limit.best()
    assert best is not None and best < 0.012  # not taken for the route
    assert limit.limit == 1  # what more in flight only slowed was given back


def test_a_route_that_got_slower_for_good_is_learnt():
    limit = answers(AdaptiveLimit(32), 2, 0.006)
    answers(limit, 64 * 25, 0.05, backlog=0, in_flight=1)
    assert limit.best() == 0.05


def test_an_unused_limit_falls_back_to_what_is_used():
    limit = answers(AdaptiveLimit(32), 10)
    assert limit.limit == 32
    answers(limit, 200, backlog=0, in_flight=10)  # a steady load that needs 10
    assert limit.limit == 15  # what was used, plus half as much again


def test_lower_to_follows_the_pool_down_but_never_below_one():
    limit = answers(AdaptiveLimit(32), 4)
    limit.lower_to(3)
    assert limit.limit == 3
    limit.lower_to(0)
    assert limit.limit == 1


# ----------------------------------------------------------------------------- the CPU time


def test_the_cpu_time_follows_a_cheaper_request_at_once_and_a_costlier_one_slowly():
    limit = AdaptiveLimit(32)
    answer(limit, cpu=0.005, backlog=0)  # a first request paying for its handshake
    answer(limit, cpu=0.0003, backlog=0)
    assert limit.cpu == pytest.approx(0.0003)
    answer(limit, cpu=0.0013, backlog=0)
    assert limit.cpu == pytest.approx(0.0005)


# ----------------------------------------------------------------------------- the lock-free path


def test_the_fast_path_takes_only_answers_that_cannot_grow_the_limit():
    limit = AdaptiveLimit(32)
    assert not limit.note_fast_success(ATTEMPT_OK, LOOPBACK, 0.0004)  # nothing known yet
    answer(limit, LOOPBACK, cpu=0.0004, backlog=0)
    assert limit.note_fast_success(ATTEMPT_OK, LOOPBACK, 0.0004)  # all CPU: nothing to decide
    assert not limit.note_fast_success(ATTEMPT_TRANSIENT, LOOPBACK, 0.0004)

    remote = AdaptiveLimit(32)
    answer(remote, backlog=0)
    assert not remote.note_fast_success(ATTEMPT_OK, SLOW, CPU)  # a second might pay


# ----------------------------------------------------------------------------- properties

outcomes = st.sampled_from([ATTEMPT_OK, ATTEMPT_TRANSIENT, ATTEMPT_REJECTED])


@settings(max_examples=300, deadline=None)
@given(
    ceiling=st.integers(1, 64),
    steps=st.lists(
        st.tuples(outcomes, st.floats(0, 2), st.floats(0, 0.01), st.integers(0, 200), st.integers(0, 80)),
        max_size=200,
    ),
)
def test_the_limit_stays_between_one_and_the_ceiling_and_grows_only_on_evidence(ceiling, steps):
    limit = AdaptiveLimit(ceiling)
    for outcome, seconds, cpu, backlog, in_flight in steps:
        before = limit.limit
        limit.observe(outcome, seconds, cpu=cpu, backlog=backlog, in_flight=in_flight)
        assert 1 <= limit.limit <= ceiling
        if outcome == ATTEMPT_TRANSIENT:
            assert limit.limit == max(1, before // 2)
        # at most half of a round trip no longer than twice a request's CPU time is off
        # the CPU (the limit's CPU time: it follows a cheaper request at once)
        all_cpu = limit.cpu is not None and seconds < 2 * limit.cpu
        if backlog == 0 or in_flight < before or all_cpu:
            assert limit.limit <= before  # no evidence that more in the air would help or pay


def test_gives_back_one_per_round_trip_of_answers_not_one_per_answer():
    # 16 in the air and the round trips now four times the base: what was added mostly
    # waits, but the 16 answers of one round trip give back one, not sixteen
    limit = answers(AdaptiveLimit(32), 5)  # the base: 50 ms
    limit.lower_to(16)
    for _ in range(16):
        answer(limit, 4 * SLOW, backlog=0, in_flight=16)
    assert limit.limit == 15

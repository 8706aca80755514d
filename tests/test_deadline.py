"""klime._deadline: one deadline shared by everything under a blocking call."""

from __future__ import annotations

import threading
import time

import pytest

from klime import ValidationError
from klime._deadline import MAX_TIMEOUT_S, Deadline, check_timeout, seconds_or_no_limit


def test_no_deadline():
    d = Deadline.after(None)
    assert d.remaining() is None and not d.expired() and d.cap(5) == 5


def test_remaining_and_cap():
    d = Deadline.after(10)
    assert 9 < d.remaining() <= 10 and d.cap(1) == 1 and d.cap(100) <= 10


def test_sleep_is_cut_by_the_deadline():
    d = Deadline.after(0.1)
    start = time.monotonic()
    assert d.sleep(5) is False
    assert time.monotonic() - start < 1


def test_sleep_completes_before_the_deadline():
    assert Deadline.after(5).sleep(0.01) is True
    assert Deadline().sleep(0) is True


def test_tighten_wakes_a_sleeper_at_once():
    d = Deadline()
    done = threading.Event()
    result = []

    def sleeper():
        result.append(d.sleep(30))
        done.set()

    threading.Thread(target=sleeper, daemon=True).start()
    time.sleep(0.05)  # let it start sleeping (the assertion below does not depend on it)
    start = time.monotonic()
    d.tighten(time.monotonic())
    assert done.wait(2) and result == [False]
    assert time.monotonic() - start < 1


def test_tighten_never_loosens():
    d = Deadline.after(1)
    at = d.at
    d.tighten(at + 100)
    assert d.at == at
    d.tighten(None)
    assert d.at == at


@pytest.mark.parametrize("forever", [None, float("inf"), 1e10, 1e300, 10**400, MAX_TIMEOUT_S + 1])
def test_check_timeout_maps_every_forever_to_no_limit(forever):
    assert check_timeout(forever) is None
    assert Deadline.after(forever).at is None


@pytest.mark.parametrize(
    "value, expected",
    [
        (0, 0.0),
        (-1, 0.0),
        (-1e300, 0.0),
        (-(10**400), 0.0),
        (float("-inf"), 0.0),
        (2.5, 2.5),
        (MAX_TIMEOUT_S, MAX_TIMEOUT_S),
    ],
)
def test_check_timeout_keeps_ordinary_values(value, expected):
    assert check_timeout(value) == expected


@pytest.mark.parametrize("bad", ["1", float("nan"), True, [1], object()])
def test_check_timeout_refuses_what_is_not_a_number(bad):
    with pytest.raises(ValidationError, match="timeout"):
        check_timeout(bad)


def test_seconds_or_no_limit():
    assert seconds_or_no_limit(1e10) is None and seconds_or_no_limit(float("inf")) is None
    assert seconds_or_no_limit(30.0) == 30.0 and seconds_or_no_limit(-3.0) == 0.0


def test_a_far_deadline_never_overflows_a_wait():
    far = Deadline(time.monotonic() + 1e12)  # beyond threading.TIMEOUT_MAX
    assert far.remaining() <= threading.TIMEOUT_MAX and far.cap(1e12) <= threading.TIMEOUT_MAX
    assert Deadline().cap(1e300) <= threading.TIMEOUT_MAX
    start = time.monotonic()
    far.tighten(time.monotonic() + 0.05)
    assert far.sleep(1e300) is False  # cut by the (tightened) deadline, no OverflowError
    assert time.monotonic() - start < 2


@pytest.mark.parametrize("seconds", [1e10, 1e300, float("inf")])
def test_a_huge_sleep_is_cut_short_by_a_deadline_without_overflow(seconds):
    start = time.monotonic()
    assert Deadline.after(0.05).sleep(seconds) is False
    assert time.monotonic() - start < 2


def test_a_huge_sleep_without_deadline_waits_until_tightened():
    d = Deadline.after(1e10)  # "forever": no deadline at all
    assert d.at is None
    result = []
    sleeping = threading.Event()
    done = threading.Event()

    def sleeper():
        sleeping.set()
        result.append(d.sleep(1e300))
        done.set()

    threading.Thread(target=sleeper, daemon=True).start()
    assert sleeping.wait(2)
    d.tighten(time.monotonic())
    assert done.wait(5) and result == [False]


@pytest.mark.parametrize("seconds", [float("nan"), -1.0, -1e300, 0])
def test_a_nan_or_negative_sleep_does_not_sleep(seconds):
    start = time.monotonic()
    assert Deadline().sleep(seconds) is True
    assert time.monotonic() - start < 1

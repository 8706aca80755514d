"""klime._deadline: one deadline shared by everything under a blocking call."""

from __future__ import annotations

import threading
import time

from klime._deadline import Deadline


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

"""How many requests may be in flight at once: the adaptive limit (see
:mod:`klime.transports._flights` for how the transports use it).

- it starts at one, and grows with every accepted request while a backlog waits, the whole
  window is in use, even the best round trip seen lately (the base) is slow (at least
  :data:`SLOW_ROUND_TRIP_S`: on a fast link one request at a time keeps up and more threads
  only fight over the GIL; a busy local server's slow moments are not a slow link; at
  least :data:`PRESSED_ROUND_TRIP_S` while the queue is half full; at least
  :data:`CPU_BOUND_ROUND_TRIP_S` while the process keeps a core busy, see
  :class:`CpuGauge`) and the round trip is not more than :data:`LATENCY_GUARD` times the base (a
  server, or a CPU, that answers slower as more requests come is saturated): toward what
  the backlog needs (the batches in the air plus those waiting), at most doubling per
  accepted request (``grow_at_once``: at once), never above ``ceiling``;
- it gives one back per accepted request while the smoothed round trip is more than
  :data:`LATENCY_SHRINK` times the base, and a limit the traffic stops using falls back
  (:meth:`AdaptiveLimit._validate`);
- it halves on every transient failure (429, 5xx, 408, timeouts, resets).

A design without these thresholds (Little's law on round trips, in-flight counts and
arrivals; AIMD) was built and measured beside this one: it lost no more events but cost the
caller's thread 12-17 % at p99 in a tight loop of ``track`` calls, where only the CPU gauge
sees that more threads take the caller's GIL turns (docs/performance.md, "A concurrency
limit without tuned thresholds").

Pure logic, no threads, no I/O. May import: the sender interface's outcome names only.
"""

from __future__ import annotations

import time
from typing import Callable, Optional, Tuple

from ..senders.base import ATTEMPT_OK, ATTEMPT_TRANSIENT

__all__ = [
    "AdaptiveLimit",
    "CPU_BOUND_ROUND_TRIP_S",
    "CPU_BOUND_SHARE",
    "CpuGauge",
    "LATENCY_GUARD",
    "LATENCY_SHRINK",
    "PRESSED_ROUND_TRIP_S",
    "SLOW_ROUND_TRIP_S",
]

#: A round trip at least this long (seconds), even the best one, makes a second request in
#: flight worth its thread: the wait is the network's, not Python's. Below it one request
#: at a time keeps up (20 events / 10 ms = 2,000 events/s per process). It is twice
#: CPython's GIL switch interval (5 ms): a busy caller's thread can hold the GIL that long,
#: so a loopback round trip measured during a burst reads 5-8 ms though the server answered
#: in one; taking that for a slow link grew the pool (8-16 threads started in a 20,000-event
#: burst) and tripled the caller's p99.9 for no gain in delivery. Klime's API is tens to
#: hundreds of milliseconds away.
SLOW_ROUND_TRIP_S = 0.010

#: While the queue is at least half full (events will be dropped soon), a best round trip
#: this long (seconds) is enough: at 2 ms one request at a time carries 10,000 events/s of
#: 20, and a nearby endpoint (2-10 ms, the same region) must not drop events that a second
#: request in flight would have carried. Loopback answers in well under 1 ms. Not while
#: the process is CPU-bound (:class:`CpuGauge`): then a round trip of a few milliseconds is
#: the GIL's wait, and more threads would only slow the caller's thread.
PRESSED_ROUND_TRIP_S = 0.002

#: While the process is CPU-bound, only a best round trip this long (seconds) is taken for
#: the wire's: four of CPython's 5 ms GIL switch intervals, the waits a request on a busy
#: interpreter can add on its own (a loopback round trip in a tight loop of ``track``
#: calls measured 12-47 ms here).
CPU_BOUND_ROUND_TRIP_S = 0.020

#: The process is CPU-bound when its threads used at least this share of one core between
#: two answers (a tight loop of ``track`` calls: 1.0 and more; a process tracking 5,000
#: events/s against a nearby endpoint: 0.3-0.5 measured here).
CPU_BOUND_SHARE = 0.8
#: The longest interval (seconds) over which :class:`CpuGauge` judges the CPU.
_GAUGE_SPAN_S = 0.5

#: No growth while a round trip takes more than this many times the base (the best one
#: seen lately): requests are queueing at the server, or in this process, not on the wire.
LATENCY_GUARD = 2.0
#: One less in flight for each accepted request while the smoothed round trip is more than
#: this many times the base: a server (or a CPU) that more requests only slow down.
LATENCY_SHRINK = 4.0

#: The base round trip is the best one seen; every this many samples it may rise by
#: :data:`_BASE_DRIFT` toward the best of those samples (a route that got slower for good
#: is learnt in about 20 windows; a burst that overloads the server is not mistaken for one).
_WINDOW = 64
_BASE_DRIFT = 1.1


class CpuGauge:
    """Did this process leave CPU to spare since the last look? Two clock reads (no I/O).
    Not thread-safe by itself: its owner's lock guards it."""

    __slots__ = ("_clock", "_cpu_clock", "_wall", "_cpu")

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        cpu_clock: Callable[[], float] = time.process_time,
    ) -> None:
        self._clock, self._cpu_clock = clock, cpu_clock
        self._wall, self._cpu = clock(), cpu_clock()

    def spare(self) -> bool:
        """True when the process used less than :data:`CPU_BOUND_SHARE` of a core since the
        previous call (or since it was made). False when that was longer ago than
        :data:`_GAUGE_SPAN_S`: an idle minute says nothing of the burst that follows."""
        wall, cpu = self._clock(), self._cpu_clock()
        elapsed, used = wall - self._wall, cpu - self._cpu
        self._wall, self._cpu = wall, cpu
        return 0 < elapsed <= _GAUGE_SPAN_S and used < CPU_BOUND_SHARE * elapsed


class AdaptiveLimit:
    """How many requests may be in flight at once (see the module docstring).

    Not thread-safe by itself: its owner's lock guards it.
    """

    __slots__ = (
        "ceiling",
        "grow_at_once",
        "limit",
        "_troubled",
        "round_trip",
        "_base",
        "_window_best",
        "_window_n",
        "_used",
        "_used_n",
        "_cpu",
    )

    def __init__(self, ceiling: int, *, grow_at_once: bool = False, cpu: Optional[CpuGauge] = None) -> None:
        self.ceiling = max(1, int(ceiling))
        #: grow straight to what the backlog needs (a flush of a known set of batches
        #: under a deadline) instead of at most doubling per accepted request
        self.grow_at_once = grow_at_once
        self.limit = 1
        self._troubled = False  # the last attempt was a transient failure
        #: a moving average of accepted round trips, seconds (None until the first)
        self.round_trip: Optional[float] = None
        self._base: Optional[float] = None  # the best round trip seen lately
        self._window_best: Optional[float] = None
        self._window_n = 0
        self._used = 0  # most requests in the air seen since the limit was last checked
        self._used_n = 0  # accepted attempts since then
        self._cpu = cpu if cpu is not None else CpuGauge()

    def observe(
        self, outcome: str, seconds: float, *, backlog: int, in_flight: int, drops_near: bool = False
    ) -> None:
        """Take one attempt's outcome. ``backlog``: batches waiting to take off (full ones,
        or deferred); ``in_flight``: requests in the air now, this one included;
        ``drops_near``: the queue is at least half full (see :data:`PRESSED_ROUND_TRIP_S`)."""
        if outcome == ATTEMPT_TRANSIENT:
            self.limit = max(1, self.limit // 2)
            self._troubled = True
            return
        if outcome != ATTEMPT_OK:
            return
        rtt, base = self._accept(seconds)
        # the CPU is sampled on every answer that could grow the limit, so that its
        # intervals follow one another
        spare = base < PRESSED_ROUND_TRIP_S or self._cpu.spare()
        wire = base >= (SLOW_ROUND_TRIP_S if spare else CPU_BOUND_ROUND_TRIP_S) or (
            drops_near and spare and base >= PRESSED_ROUND_TRIP_S
        )
        if rtt > LATENCY_SHRINK * base and self.limit > 1:
            self.limit -= 1  # more in flight only queues: give some back
        elif (
            backlog
            and in_flight >= self.limit
            and self.limit < self.ceiling
            and wire  # the wait is the wire's, not the CPU's
            and seconds <= LATENCY_GUARD * base
        ):
            # toward what the backlog needs, at most doubling per accepted request
            needed = in_flight + backlog
            step = needed if self.grow_at_once else min(needed, 2 * self.limit)
            self.limit = min(self.ceiling, max(self.limit + 1, step))
        self._validate(in_flight)

    def _validate(self, in_flight: int) -> None:
        """A limit the traffic does not use is not kept: after two windows' worth of
        accepted requests that never filled it, it falls to what was used plus half as much
        again (so a steady load holds about the threads and connections it needs, with room
        for a burst while the limit grows back)."""
        self._used = max(self._used, in_flight)
        self._used_n += 1
        if self._used_n >= 2 * self.limit:
            if self._used < self.limit:
                self.limit = max(1, min(self.limit, self._used + max(1, self._used // 2)))
            self._used = self._used_n = 0

    def _note(self, seconds: float) -> float:
        """Take a round-trip sample; return the base round trip."""
        base = self._base
        base = self._base = seconds if base is None else min(base, seconds)
        window_best = self._window_best
        self._window_best = seconds if window_best is None else min(window_best, seconds)
        self._window_n += 1
        if self._window_n >= _WINDOW:  # drift up, slowly, toward what the route gives now
            self._base = base = max(base, min(self._window_best, base * _BASE_DRIFT))
            self._window_best, self._window_n = None, 0
        return base

    def best(self) -> Optional[float]:
        """The base round trip: the best one seen lately, seconds (None until the first)."""
        return self._base

    def note_fast_success(self, outcome: str, seconds: float) -> bool:
        """For an accepted request while one at a time is sent and round trips are fast:
        nothing can change but the round-trip figures, noted here without the owner's lock
        (only one request is in the air). True when that was all; False: call
        :meth:`observe` under the lock."""
        if outcome != ATTEMPT_OK or self.limit != 1:
            return False
        base = self._base
        if base is None or min(base, seconds) >= SLOW_ROUND_TRIP_S:
            return False  # round trips may be slow: growth is for observe() to decide
        self._accept(seconds)
        return True

    def _accept(self, seconds: float) -> Tuple[float, float]:
        """Note an accepted request's round trip; return the smoothed one and the base."""
        self._troubled = False
        previous = self.round_trip
        rtt = self.round_trip = seconds if previous is None else 0.8 * previous + 0.2 * seconds
        return rtt, self._note(seconds)

    def allow_all_at_once(self, batches: int) -> None:
        """A known set of ``batches`` is about to go (an invocation's flush): when round
        trips have been slow and the last attempt did not fail, let them all go at once (up
        to the ceiling) instead of learning again; else leave the limit as it is."""
        if self.slow() and not self._troubled:
            self.limit = max(self.limit, min(self.ceiling, batches))

    def slow(self) -> bool:
        """Have round trips been slow enough for concurrency to pay (even the best one)?"""
        return self._base is not None and self._base >= SLOW_ROUND_TRIP_S

    def lower_to(self, at_most: int) -> None:
        """Lower the limit to ``at_most`` (never below one): threads were retired."""
        self.limit = max(1, min(self.limit, at_most))

    def __repr__(self) -> str:
        rtt = "?" if self.round_trip is None else f"{self.round_trip * 1000:.1f}ms"
        return f"AdaptiveLimit(limit={self.limit}, ceiling={self.ceiling}, round_trip={rtt})"

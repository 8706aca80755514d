"""How many requests may be in flight at once (see :mod:`klime.transports._flights` for
how the transports use it).

The limit reasons from what it measures, answer by answer, not from round-trip thresholds
tuned on one machine. Each accepted answer brings its round trip ``R``, the CPU time the
attempt took on its own thread ``c``, the requests in the air ``N`` (that one included)
and the batches waiting. The limit keeps ``B``, the base round trip: the best one seen
lately, what one request costs when nothing waits (neither the server, nor this process).

- **What more in flight would carry (Little's law).** ``N`` requests taking ``R`` each
  carry ``N / R`` requests a second; one alone on an idle path carries ``1 / B``. The
  ``N - 1`` requests beyond the first therefore carry ``(N·B/R - 1)/(N - 1)`` of their
  share (:func:`carried_share`): 1 when the round trip does not grow with ``N`` (the wait
  is the network's and the server's), 0 when it grows in proportion to ``N`` (a
  bottleneck: more requests only queue there).
- **What more in flight would take (the interpreter).** Threads of one CPython process
  overlap only what a request spends off the CPU: its wire time, ``B - c`` at best. The
  rest is the interpreter's, which the process's other threads (the application's, which
  called ``track``) need too. So more requests pay only while the off-CPU part is at least
  half of the round trip (:func:`off_cpu_share`). On loopback a request is mostly CPU
  (``c`` about as long as ``B``): one at a time, whatever the load. When the
  application's threads keep the interpreter busy, every request waits for its turns and
  ``R`` grows past ``2·(B - c)``: the limit does not take more turns from them. A remote
  endpoint's round trip is wire time, busy interpreter or not: the limit grows there.
- **When more in flight is needed.** ``N`` requests in the air for ``R`` each carry
  ``N / R`` batches a second (Little's law). A full batch waiting while all ``N`` are in
  the air is the measured sign that the arrivals outrun that, or that a pile left from
  when the limit was lower is still draining. A known set under a deadline
  (``grow_at_once``) needs room for all of it.
- **Grow** while more is needed, the whole window is in use, and both shares above are
  at least :data:`GAIN_SHARE` on this answer's round trip and on the smoothed one (a new
  best round trip alone says nothing of what more requests would do): toward what the
  backlog needs (the batches in the air plus those waiting), at most doubling per answer
  (``grow_at_once``: at once), never above ``ceiling``.
- **Give one back** per round trip's worth of answers (``N``) while either share, on the
  smoothed round trip, is below :data:`HOLD_SHARE` (between the two the limit holds: a
  round trip's jitter moves nothing; one per answer would empty the window before the
  smoothed round trip shows what the smaller number does). A level given back for that
  reason is a *knee*: the limit does not grow to it again for :data:`_KNEE_WINDOW`
  answers, so a probe that did not pay costs a few requests, not a flapping pool.
- **Halve** on every transient failure (429, 5xx, 408, timeouts, resets): multiplicative
  decrease, as TCP does on a loss; the retry loop's backoff does the rest.
- **Fall back when unused** (:meth:`AdaptiveLimit._validate`): to what was used plus half
  as much again, rounded down.

Pure logic, no threads, no I/O. May import: the sender interface's outcome names only.
"""

from __future__ import annotations

from typing import Optional, Tuple

from ..senders.base import ATTEMPT_OK, ATTEMPT_TRANSIENT

__all__ = ["AdaptiveLimit", "GAIN_SHARE", "HOLD_SHARE", "carried_share", "off_cpu_share"]

#: Grow only while the requests beyond the first carry at least this share of what each
#: would carry alone, and a request spends at least this share of its round trip off the
#: CPU: more than half of what is added is gained.
GAIN_SHARE = 0.5
#: Give one back while either share is below this: what was added mostly waits.
HOLD_SHARE = 0.25

#: Weight of the newest sample in the smoothed round trip and CPU time.
_SMOOTHING = 0.2
#: The base round trip is the best one seen; every this many samples it may rise by
#: :data:`_BASE_DRIFT` toward the best of those samples (a route that got slower for good
#: is learnt in about 20 windows; a burst that overloads the server is not mistaken for one).
_WINDOW = 64
_BASE_DRIFT = 1.1
#: Answers during which a level given back is not tried again.
_KNEE_WINDOW = 64


def carried_share(in_flight: int, round_trip: float, base: float) -> float:
    """Of what ``in_flight - 1`` more requests would carry on an idle path, the share they
    carry when each takes ``round_trip`` and one alone ``base`` (1.0 for one request).
    Little's law: ``N`` requests in the air for ``R`` carry ``N / R`` a second."""
    if in_flight <= 1:
        return 1.0
    if round_trip <= 0:
        return 1.0
    return (in_flight * base / round_trip - 1) / (in_flight - 1)


def off_cpu_share(round_trip: float, base: float, cpu: float) -> float:
    """The share of a ``round_trip`` that other requests could overlap without taking the
    interpreter from anyone: the best round trip, less the CPU one request costs its
    thread (``cpu``), over ``round_trip``."""
    if round_trip <= 0:
        return 0.0
    return max(0.0, base - cpu) / round_trip


class AdaptiveLimit:
    """How many requests may be in flight at once (see the module docstring).

    Not thread-safe by itself: its owner's lock guards it (except
    :meth:`note_fast_success`, see there).
    """

    __slots__ = (
        "ceiling",
        "grow_at_once",
        "limit",
        "round_trip",
        "cpu",
        "_troubled",
        "_pays",
        "_base",
        "_window_best",
        "_window_n",
        "_used",
        "_used_n",
        "_knee",
        "_knee_left",
        "_since_given_back",
    )

    def __init__(self, ceiling: int, *, grow_at_once: bool = False) -> None:
        self.ceiling = max(1, int(ceiling))
        #: grow straight to what the backlog needs (a flush of a known set of batches
        #: under a deadline) instead of at most doubling per accepted request
        self.grow_at_once = grow_at_once
        self.limit = 1
        #: the smoothed round trip of accepted requests, and the CPU time one costs its
        #: thread (:meth:`_cpu_with`), seconds (None until the first)
        self.round_trip: Optional[float] = None
        self.cpu: Optional[float] = None
        self._troubled = False  # the last attempt was a transient failure
        self._pays = False  # the last answer said more in flight would pay
        self._base: Optional[float] = None  # the best round trip seen lately
        self._window_best: Optional[float] = None
        self._window_n = 0
        self._used = 0  # most requests in the air seen since the limit was last checked
        self._used_n = 0  # accepted attempts since then
        self._knee = 0  # a level given back for lack of gain (0: none); no growth to it
        self._knee_left = 0  # accepted requests until the knee is forgotten
        self._since_given_back = 0  # accepted answers since one was given back

    def observe(
        self,
        outcome: str,
        seconds: float,
        *,
        cpu: float = 0.0,
        backlog: int,
        in_flight: int,
    ) -> None:
        """Take one attempt's outcome: its round trip ``seconds`` and the CPU time ``cpu``
        it took on its thread. ``backlog``: batches waiting to take off (full ones, or
        deferred); ``in_flight``: requests in the air now, this one included."""
        if outcome == ATTEMPT_TRANSIENT:
            self.limit = max(1, self.limit // 2)
            self._troubled = True
            return
        if outcome != ATTEMPT_OK:
            return
        rtt, cpu_each, base = self._accept(seconds, cpu)
        limit = self.limit
        pays_now = self._pays_at(in_flight, rtt, base, cpu_each)
        self._pays = pays_now >= GAIN_SHARE
        self._since_given_back += 1
        if limit > 1 and pays_now < HOLD_SHARE:
            # what was added mostly waits (at a bottleneck, or for the interpreter): give
            # one back, once per round trip's worth of answers (the smoothed round trip
            # needs that long to show what the smaller number does), and do not come back
            # to this level for a while
            if self._since_given_back >= in_flight:
                self.limit = limit - 1
                self._knee, self._knee_left = limit, _KNEE_WINDOW
                self._since_given_back = 0
        elif (
            backlog  # more is needed: a batch waits while the whole window is in the air
            and in_flight >= limit
            and limit < self.ceiling
            and self._pays
            and self._pays_at(in_flight, seconds, base, cpu_each) >= GAIN_SHARE
            and not (self._knee and limit + 1 >= self._knee)
        ):
            # toward what the backlog needs, at most doubling per accepted request
            needed = in_flight + backlog
            step = needed if self.grow_at_once else min(needed, 2 * limit)
            if self._knee:
                step = min(step, self._knee - 1)
            self.limit = min(self.ceiling, max(limit + 1, step))
        self._validate(in_flight)

    @staticmethod
    def _pays_at(in_flight: int, round_trip: float, base: float, cpu: float) -> float:
        """The lesser of the two shares (module docstring) for a round trip of ``round_trip``."""
        return min(carried_share(in_flight, round_trip, base), off_cpu_share(round_trip, base, cpu))

    def _validate(self, in_flight: int) -> None:
        """A limit the traffic does not use is not kept: after two windows' worth of
        accepted requests that never filled it, it falls to what was used plus half as much
        again, rounded down (a steady load holds about the threads and connections it
        needs, with room for a burst while the limit grows back; one request at a time
        falls back to one)."""
        self._used = max(self._used, in_flight)
        self._used_n += 1
        if self._used_n >= 2 * self.limit:
            if self._used < self.limit:
                self.limit = max(1, min(self.limit, self._used + self._used // 2))
            self._used = self._used_n = 0

    def _accept(self, seconds: float, cpu: float) -> Tuple[float, float, float]:
        """Note an accepted request; return the smoothed round trip and CPU time, and the base."""
        self._troubled = False
        rtt = self.round_trip
        rtt = self.round_trip = seconds if rtt is None else rtt + _SMOOTHING * (seconds - rtt)
        cpu_each = self.cpu = self._cpu_with(cpu)
        base = self._base
        base = self._base = seconds if base is None else min(base, seconds)
        window_best = self._window_best
        self._window_best = seconds if window_best is None else min(window_best, seconds)
        self._window_n += 1
        if self._window_n >= _WINDOW:  # drift up, slowly, toward what the route gives now
            self._base = base = max(base, min(self._window_best, base * _BASE_DRIFT))
            self._window_best, self._window_n = None, 0
        if self._knee_left:
            self._knee_left -= 1
            if not self._knee_left:
                self._knee = 0
        return rtt, cpu_each, base

    def _cpu_with(self, cpu: float) -> float:
        """The CPU time of a request, with ``cpu`` taken in: it follows a cheaper request at
        once and a costlier one slowly (the first request on a connection pays for its
        handshake; a steady cost is learnt within a few answers)."""
        cpu_each = self.cpu
        if cpu_each is None or cpu <= cpu_each:
            return cpu
        return cpu_each + _SMOOTHING * (cpu - cpu_each)

    def best(self) -> Optional[float]:
        """The base round trip: the best one seen lately, seconds (None until the first)."""
        return self._base

    def note_fast_success(self, outcome: str, seconds: float, cpu: float = 0.0) -> bool:
        """For an accepted request while one at a time is sent: when it cannot grow the
        limit (it spent less than :data:`GAIN_SHARE` of its round trip off the CPU, or a
        second request was tried lately and did not pay), note its figures here without
        the owner's lock (only one request is in the air) and return True; False: call
        :meth:`observe` under the lock."""
        if outcome != ATTEMPT_OK or self.limit != 1 or self._base is None or self.cpu is None:
            return False
        knee_holds = self._knee == 2 and self._knee_left > 0
        off_cpu = off_cpu_share(seconds, min(self._base, seconds), self._cpu_with(cpu))
        if not knee_holds and off_cpu >= GAIN_SHARE:
            return False  # a second request might pay: for observe() to decide
        self._accept(seconds, cpu)
        self._pays = False
        return True

    def allow_all_at_once(self, batches: int) -> None:
        """A known set of ``batches`` is about to go (an invocation's flush): when the last
        answer said more in flight would pay and the last attempt did not fail, let them
        all go at once (up to the ceiling) instead of learning again; else leave the limit
        as it is."""
        if self._pays and not self._troubled:
            self.limit = max(self.limit, min(self.ceiling, batches))

    def lower_to(self, at_most: int) -> None:
        """Lower the limit to ``at_most`` (never below one): threads were retired."""
        self.limit = max(1, min(self.limit, at_most))

    def __repr__(self) -> str:
        rtt = "?" if self.round_trip is None else f"{self.round_trip * 1000:.1f}ms"
        return f"AdaptiveLimit(limit={self.limit}, ceiling={self.ceiling}, round_trip={rtt})"

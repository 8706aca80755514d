"""Several batches in flight at once: the adaptive limit, the batches in the air, their threads.

One request at a time can deliver at most ``max_batch_size / round trip`` events per
second (400/s at the defaults and 50 ms), whatever the CPU. So when a backlog waits and
round trips are slow, a transport keeps several requests in flight on the sender's
keep-alive connections. How many is decided by :class:`AdaptiveLimit`, from what the
destination answers, attempt by attempt (the sender's :data:`~klime.senders.base.Feedback`):

- it starts at one, and grows with every accepted request while a backlog waits, the whole
  window is in use, the round trip is slow (at least :data:`SLOW_ROUND_TRIP_S`: on a fast
  link one request at a time keeps up and more threads only fight over the GIL) and not
  more than :data:`LATENCY_GUARD` times its recent best (a server that answers slower under
  load is saturated): toward what the backlog needs (the batches in the air plus those
  waiting), at most doubling per accepted request, never above ``ceiling``. A limit the
  traffic stops using falls back (see :meth:`AdaptiveLimit._validate`);
- it halves on every transient failure (429, 5xx, 408, timeouts, resets): a struggling
  server is not hammered. A batch that failed while more are in flight than the limit
  allows stops retrying and is *deferred*: it waits, first in line, until the limit lets it
  go again, so that against a server failing everything one batch retries with backoff and
  the request rate is that of one request at a time.

:class:`Flights` holds, for one transport, the batches in the air and those deferred, and
the threads that fly them (a bounded pool: started on demand, never more than the limit,
helpers retired when idle). The background transport keeps its pool for the life of the
process; the invocation transport's helpers end with each flush. An invocation's flush is
a known set of batches under a deadline: its limit grows straight to what the set needs
(``jump``), and a warm invocation whose round trips were slow sends them all at once
(:meth:`AdaptiveLimit.open_to`) — about one round trip instead of learning again. Every method named
``*_locked`` needs the owner's lock, which :class:`Flights` shares.

Imports: the standard library and the sender interface's outcome names only.
"""

from __future__ import annotations

import threading
from collections import deque
from threading import Thread
from typing import Callable, Deque, List, Optional

from ..senders.base import ATTEMPT_OK, ATTEMPT_TRANSIENT

__all__ = ["AdaptiveLimit", "Batch", "Flights", "LATENCY_GUARD", "SLOW_ROUND_TRIP_S"]

#: A round trip at least this long (seconds) makes a second request in flight worth its
#: thread: the wait is the network's, not Python's. Measured here: 100 events in 5
#: requests to a loopback collector took 3.6 ms one after the other, 7.5 ms on 4 threads.
SLOW_ROUND_TRIP_S = 0.002

#: No growth while a round trip takes more than this many times the recent best one.
LATENCY_GUARD = 2.0

#: Round-trip samples per window of the "recent best" (its minimum over two windows).
_WINDOW = 64


class AdaptiveLimit:
    """How many requests may be in flight at once (see the module docstring).

    Not thread-safe by itself: its owner's lock guards it.
    """

    __slots__ = (
        "ceiling",
        "jump",
        "limit",
        "_troubled",
        "round_trip",
        "_best",
        "_window_best",
        "_window_n",
        "_used",
        "_used_n",
    )

    def __init__(self, ceiling: int, *, jump: bool = False) -> None:
        self.ceiling = max(1, int(ceiling))
        #: grow straight to what the backlog needs (a flush of a known set of batches
        #: under a deadline) instead of at most doubling per accepted request
        self.jump = jump
        self.limit = 1
        self._troubled = False  # the last attempt was a transient failure
        #: a moving average of accepted round trips, seconds (None until the first)
        self.round_trip: Optional[float] = None
        self._best: Optional[float] = None  # best of the previous window
        self._window_best: Optional[float] = None
        self._window_n = 0
        self._used = 0  # most requests in the air seen since the limit was last checked
        self._used_n = 0  # accepted attempts since then

    def observe(self, outcome: str, seconds: float, *, backlog: int, in_flight: int) -> None:
        """Take one attempt's outcome. ``backlog``: batches waiting to take off (full ones,
        or deferred); ``in_flight``: requests in the air now, this one included."""
        if outcome == ATTEMPT_TRANSIENT:
            self.limit = max(1, self.limit // 2)
            self._troubled = True
            return
        if outcome != ATTEMPT_OK:
            return
        self._troubled = False
        previous = self.round_trip
        self.round_trip = seconds if previous is None else 0.8 * previous + 0.2 * seconds
        best = self.best()
        self._note(seconds)
        if (
            backlog
            and in_flight >= self.limit
            and self.limit < self.ceiling
            and seconds >= SLOW_ROUND_TRIP_S
            and (best is None or seconds <= LATENCY_GUARD * best)
        ):
            # toward what the backlog needs, at most doubling per accepted request
            needed = in_flight + backlog
            step = needed if self.jump else min(needed, 2 * self.limit)
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

    def _note(self, seconds: float) -> None:
        window_best = self._window_best
        self._window_best = seconds if window_best is None else min(window_best, seconds)
        self._window_n += 1
        if self._window_n >= _WINDOW:
            self._best, self._window_best, self._window_n = self._window_best, None, 0

    def best(self) -> Optional[float]:
        """The recent best round trip, seconds (None until the first)."""
        candidates = [t for t in (self._best, self._window_best) if t is not None]
        return min(candidates) if candidates else None

    def open_to(self, batches: int) -> None:
        """A known set of ``batches`` is about to go (an invocation's flush): when round
        trips have been slow and the last attempt did not fail, let them all go at once (up
        to the ceiling) instead of learning again; else leave the limit as it is."""
        if self.slow() and not self._troubled:
            self.limit = max(self.limit, min(self.ceiling, batches))

    def slow(self) -> bool:
        """Have round trips been slow enough for concurrency to pay?"""
        return self.round_trip is not None and self.round_trip >= SLOW_ROUND_TRIP_S

    def relax(self, at_most: int) -> None:
        """Lower the limit to ``at_most`` (never below one): threads were retired."""
        self.limit = max(1, min(self.limit, at_most))

    def __repr__(self) -> str:
        rtt = "?" if self.round_trip is None else f"{self.round_trip * 1000:.1f}ms"
        return f"AdaptiveLimit(limit={self.limit}, ceiling={self.ceiling}, round_trip={rtt})"


class Batch:
    """Events that leave the queue together. ``start`` is the sequence number of the first
    (the owner's book-keeping); ``attempts`` counts the attempts made in earlier, deferred
    flights; ``taken`` is set once its outcome is settled (by its flight, or by a shutdown
    that gave up on it); ``error`` says why its last attempt failed, when deferred;
    ``ref`` is the owner's own (the spool transport keeps the batch's claimed rows there)."""

    __slots__ = ("start", "events", "attempts", "taken", "error", "ref")

    def __init__(self, start: int, events: List[bytes], attempts: int = 0, error: object = None) -> None:
        self.start = start
        self.events = events
        self.attempts = attempts
        self.taken = False
        self.error = error
        #: what the owner keeps with the batch (the spool transport: its claimed rows)
        self.ref: object = None


class Flights:
    """The batches one transport has in the air and deferred, and the threads flying them.

    ``lock`` is the owner's lock; ``work`` is a condition on it where idle threads wait.
    """

    def __init__(self, lock: threading.Lock, *, ceiling: int, name: str, jump: bool = False) -> None:
        self.lock = lock
        self.work = threading.Condition(lock)
        self.limit = AdaptiveLimit(ceiling, jump=jump)
        self.name = name
        self.flying: List[Batch] = []
        self.parked: Deque[Batch] = deque()
        self.threads: List[threading.Thread] = []
        self.idle = 0
        #: set when a thread could not be started (interpreter shutdown): do not try again
        self.no_threads = False
        self._started = 0

    # ------------------------------------------------------------ taking and landing

    def room_locked(self) -> bool:
        """May one more request take off now?"""
        return len(self.flying) < self.limit.limit

    def board_locked(self, batch: Batch) -> Batch:
        self.flying.append(batch)
        return batch

    def take_parked_locked(self) -> Optional[Batch]:
        """The oldest deferred batch, if the limit lets it fly; it is then in the air."""
        if self.parked and self.room_locked():
            return self.board_locked(self.parked.popleft())
        return None

    def land_locked(self, batch: Batch, unsent: List[bytes], attempts: int, error: object) -> bool:
        """Settle ``batch``: it leaves the air; its ``unsent`` events wait, first in line.

        Returns False (and changes nothing) when it was settled already."""
        if batch.taken:
            return False
        batch.taken = True
        try:
            self.flying.remove(batch)
        except ValueError:
            pass
        if unsent:
            self.parked.append(Batch(batch.start, unsent, attempts, error))
        if self.idle:
            self.work.notify()
        return True

    def abandon_locked(self) -> tuple[List[Batch], List[Batch]]:
        """Give up on everything: (batches in the air whose outcome will not be counted,
        deferred batches). Both lists are the caller's to report."""
        abandoned = [b for b in self.flying if not b.taken]
        for batch in abandoned:
            batch.taken = True
        self.flying = []
        parked = list(self.parked)
        self.parked.clear()
        return abandoned, parked

    def held_locked(self) -> int:
        """Events in the air or deferred (those of batches with a ``ref`` are held elsewhere
        too, on disk, and not counted here)."""
        return sum(len(b.events) for b in (*self.flying, *self.parked) if b.ref is None)

    def settled_locked(self, target: int) -> bool:
        """Are all batches holding events with sequence number < ``target`` settled?"""
        return all(b.start >= target for b in self.flying) and all(b.start >= target for b in self.parked)

    def unsettled_locked(self, target: int) -> int:
        """Events with sequence number < ``target`` in the air or deferred (an upper bound)."""
        count = 0
        for batch in (*self.flying, *self.parked):
            if batch.start < target:
                count += min(len(batch.events), target - batch.start)
        return count

    # ------------------------------------------------------------ feedback

    def feedback_locked(self, outcome: str, seconds: float, *, backlog: int) -> bool:
        """One attempt's outcome (see :class:`AdaptiveLimit`). After a transient failure,
        True means "keep retrying": no more are in the air than the limit now allows."""
        limit = self.limit
        before = limit.limit
        limit.observe(outcome, seconds, backlog=backlog, in_flight=len(self.flying))
        if limit.limit > before and self.idle:
            self.work.notify()
        if outcome != ATTEMPT_TRANSIENT:
            return True
        return len(self.flying) <= limit.limit

    # ------------------------------------------------------------ threads

    def threads_wanted_locked(self, takeable: int) -> int:
        """How many more threads to start so that ``takeable`` batches (waiting, and allowed
        by the limit) can take off now: none while a thread is idle (it is woken instead)
        or when threads cannot start; never beyond the limit."""
        if self.no_threads or self.idle or takeable <= 0:
            return 0
        room = self.limit.limit - len(self.flying)
        return max(0, min(takeable, room, self.limit.limit - len(self.threads)))

    def spawn(self, target: Callable[[], None]) -> Optional[threading.Thread]:
        """Start a helper thread (``<name>-<n>``) running ``target``; None when threads cannot
        start (interpreter shutdown: then :attr:`no_threads` is set). Call without the lock."""
        with self.lock:
            thread = self.prepare_locked(target)
        return thread if self.launch(thread) else None

    def prepare_locked(self, target: Callable[[], None], *, name: Optional[str] = None) -> threading.Thread:
        """A named daemon thread for ``target``, counted in the pool; start it with
        :meth:`launch` after releasing the lock."""
        self._started += 1
        thread = Thread(target=target, name=name or f"{self.name}-{self._started}", daemon=True)
        self.threads.append(thread)
        return thread

    def launch(self, thread: threading.Thread) -> bool:
        """Start a thread made by :meth:`prepare_locked`; False (and it is forgotten) when
        threads cannot start. Call without the lock."""
        try:
            thread.start()
        except RuntimeError:  # "can't create new thread at interpreter shutdown"
            with self.lock:
                self.no_threads = True
                self._forget_locked(thread)
            return False
        return True

    def retire_locked(self, thread: threading.Thread, *, relax: bool = True) -> None:
        """``thread`` is leaving; with ``relax``, the limit follows the pool down (the
        invocation transport keeps its limit from one flush to the next)."""
        self._forget_locked(thread)
        if relax:
            self.limit.relax(max(1, len(self.threads)))

    def _forget_locked(self, thread: threading.Thread) -> None:
        try:
            self.threads.remove(thread)
        except ValueError:
            pass

    def alive(self) -> List[threading.Thread]:
        with self.lock:
            return [t for t in self.threads if t.is_alive()]

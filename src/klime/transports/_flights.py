"""Several batches in flight at once: the batches in the air, their threads, and a flush
of a known set of batches under one deadline.

One request at a time can deliver at most ``max_batch_size / round trip`` events per
second (400/s at the defaults and 50 ms), whatever the CPU. So when a backlog waits and
more requests would pay, a transport keeps several requests in flight on the sender's
keep-alive connections, as many as :class:`~klime.transports._limit.AdaptiveLimit` allows,
from what the destination answers attempt by attempt (the retry loop tells the
transport's :data:`~klime.senders.base.Pace` each outcome). A batch that failed transiently while more are in
flight than the limit allows stops retrying and is *deferred*: it waits, first in line,
until the limit lets it go again, so that against a server failing everything one batch
retries with backoff and the request rate is that of one request at a time.

:class:`Flights` holds, for one transport, the batches in the air and those deferred, and
the threads that fly them (a bounded pool: started on demand, never more than the limit,
helpers retired when idle). It runs no loop: the pump's one loop
(:func:`klime.transports.background.fly_batches`) takes and flies the batches. The
background transport keeps its pool for the life of the process. An invocation's flush
(the pump's on-demand drain over a known set of batches,
:func:`klime.transports.background.drain_on_demand`) uses the caller's thread and helpers
that end before it returns: its limit grows straight to what the set needs
(``grow_at_once``), and a warm invocation whose last answer said more would pay sends them all at
once (:meth:`AdaptiveLimit.allow_all_at_once`) — about one round trip instead of learning
again. Every method named ``*_locked`` needs the owner's lock, which :class:`Flights`
shares.

May import: the standard library, the sender interface and the adaptive limit.
"""

from __future__ import annotations

import threading
from collections import deque
from threading import Thread
from typing import Callable, Deque, List, Optional

from .._retry import FIRST_TRY, Retry
from ..senders.base import ATTEMPT_TRANSIENT
from ._limit import AdaptiveLimit

__all__ = ["AdaptiveLimit", "Batch", "Flights"]

class Batch:
    """Events that leave the queue together. ``start`` is the sequence number of the first
    (the owner's book-keeping); ``retry`` is where it stands in its retries (attempts
    made in earlier, deferred flights); ``taken`` is set once its outcome is settled (by
    its flight, or by a shutdown that gave up on it); ``error`` says why its last attempt
    failed, when deferred; ``ref`` is the owner's own (the spool transport keeps the
    batch's claimed rows there)."""

    __slots__ = ("start", "events", "retry", "taken", "error", "spool_rows")

    def __init__(
        self, start: int, events: List[bytes], retry: Retry = FIRST_TRY, error: object = None
    ) -> None:
        self.start = start
        self.events = events
        self.retry = retry
        self.taken = False
        self.error = error
        #: what the owner keeps with the batch (the spool transport: its claimed rows)
        self.spool_rows: object = None

    @property
    def attempts(self) -> int:
        """Attempts made for this batch's events so far."""
        return self.retry.attempts


class Flights:
    """The batches one transport has in the air and deferred, and the threads flying them.

    ``lock`` is the owner's lock; ``work`` is a condition on it where idle threads wait.
    """

    def __init__(self, lock: threading.Lock, *, ceiling: int, name: str, grow_at_once: bool = False) -> None:
        self.lock = lock
        self.work = threading.Condition(lock)
        self.limit = AdaptiveLimit(ceiling, grow_at_once=grow_at_once)
        self.name = name
        self.flying: List[Batch] = []
        self.deferred: Deque[Batch] = deque()
        self.threads: List[threading.Thread] = []
        self.idle = 0
        self.starting = 0  # threads decided on, not yet in :attr:`threads`
        #: set when a thread could not be started (interpreter shutdown): do not try again
        self.no_threads = False
        self._started = 0

    # ------------------------------------------------------------ taking and landing

    def room_locked(self) -> bool:
        """May one more request take off now?"""
        return len(self.flying) < self.limit.limit

    def mark_sending_locked(self, batch: Batch) -> Batch:
        self.flying.append(batch)
        return batch

    def take_deferred_locked(self) -> Optional[Batch]:
        """The oldest deferred batch, if the limit lets it fly; it is then in the air."""
        if self.deferred and self.room_locked():
            return self.mark_sending_locked(self.deferred.popleft())
        return None

    def settle_locked(self, batch: Batch, unsent: List[bytes], retry: Retry, error: object) -> bool:
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
            self.deferred.append(Batch(batch.start, unsent, retry, error))
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
        parked = list(self.deferred)
        self.deferred.clear()
        return abandoned, parked

    def held_locked(self) -> int:
        """Events in the air or deferred (those of batches with a ``ref`` are held elsewhere
        too, on disk, and not counted here)."""
        return sum(len(b.events) for b in (*self.flying, *self.deferred) if b.spool_rows is None)

    def settled_locked(self, target: int) -> bool:
        """Are all batches holding events with sequence number < ``target`` settled?"""
        return all(b.start >= target for b in self.flying) and all(b.start >= target for b in self.deferred)

    def unsettled_locked(self, target: int) -> int:
        """Events with sequence number < ``target`` in the air or deferred (an upper bound)."""
        count = 0
        for batch in (*self.flying, *self.deferred):
            if batch.start < target:
                count += min(len(batch.events), target - batch.start)
        return count

    # ------------------------------------------------------------ pacing

    def pace_locked(self, outcome: str, seconds: float, cpu: float, *, backlog: int) -> bool:
        """One attempt's outcome: its round trip and the CPU time it took on its thread,
        seconds (see :class:`AdaptiveLimit`). After a transient failure, True means "keep
        retrying": no more are in the air than the limit now allows."""
        limit = self.limit
        before = limit.limit
        in_flight = len(self.flying)
        limit.observe(outcome, seconds, cpu=cpu, backlog=backlog, in_flight=in_flight)
        if limit.limit > before and self.idle:
            self.work.notify()
        if outcome != ATTEMPT_TRANSIENT:
            return True
        return len(self.flying) <= limit.limit

    # ------------------------------------------------------------ threads

    def ceiling_locked(self) -> int:
        """The most threads the pool may have (idle ones above the limit stay until they
        have been idle long enough: a limit that dips and comes back starts no thread)."""
        return self.limit.ceiling

    def threads_wanted_locked(self, takeable: int) -> int:
        """How many more threads to start so that ``takeable`` batches (waiting, and allowed
        by the limit) can take off now: none while a thread is idle (it is woken instead)
        or when threads cannot start; never beyond the limit."""
        if self.no_threads or self.idle or takeable <= 0:
            return 0
        room = self.limit.limit - len(self.flying)
        wanted = max(0, min(takeable, room, self.limit.limit - len(self.threads) - self.starting))
        self.starting += wanted  # counted at once: two threads deciding together never overshoot
        return wanted

    def spawn(self, target: Callable[[], None]) -> Optional[threading.Thread]:
        """Start a helper thread (``<name>-<n>``) running ``target``, one that
        :meth:`threads_wanted_locked` counted; None when threads cannot start (interpreter
        shutdown: then :attr:`no_threads` is set). Call without the lock."""
        with self.lock:
            thread = self.prepare_locked(target, wanted=True)
        return thread if self.launch(thread) else None

    def spawn_helpers(self, target: Callable[[], None], n: int) -> List[threading.Thread]:
        """Start ``n`` helper threads running ``target``, ones that
        :meth:`threads_wanted_locked` counted; stops at the first that cannot start (and
        forgets the rest). Returns those started. Call without the lock."""
        started: List[threading.Thread] = []
        for k in range(n):
            thread = self.spawn(target)
            if thread is None:
                with self.lock:
                    self.unwanted_locked(n - k - 1)
                break
            started.append(thread)
        return started

    def unwanted_locked(self, n: int) -> None:
        """``n`` threads counted by :meth:`threads_wanted_locked` will not be started."""
        self.starting = max(0, self.starting - n)

    def prepare_locked(
        self, target: Callable[[], None], *, name: Optional[str] = None, wanted: bool = False
    ) -> threading.Thread:
        """A named daemon thread for ``target``, counted in the pool; start it with
        :meth:`launch` after releasing the lock. ``wanted``: one that
        :meth:`threads_wanted_locked` counted."""
        if wanted:
            self.starting = max(0, self.starting - 1)
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

    def retire_locked(self, thread: threading.Thread, *, lower_limit: bool = True) -> None:
        """``thread`` is leaving; with ``relax``, the limit follows the pool down (the
        invocation transport keeps its limit from one flush to the next)."""
        self._forget_locked(thread)
        if lower_limit:
            self.limit.lower_to(max(1, len(self.threads)))

    def _forget_locked(self, thread: threading.Thread) -> None:
        try:
            self.threads.remove(thread)
        except ValueError:
            pass

    def alive(self) -> List[threading.Thread]:
        with self.lock:
            return [t for t in self.threads if t.is_alive()]

"""The loop of the background transport's sender threads (a mixin of
:class:`~klime.transports.background.BackgroundTransport`, and so of the spool transport).

The first thread, ``klime-sender``, starts on the first event of a process (where a thread
may run: :mod:`klime._runtime`); it keeps the flush interval and never retires. Under a
backlog with slow round trips it is joined by helpers (``klime-sender-<n>``), started for
all the room the adaptive limit gives at once, ended after :data:`IDLE_RETIRE_S` without
work or when more are running than the limit needs. Each thread takes a batch (deferred
ones first; a full one while the limit allows; a partial one only when released by the
interval, a flush or the shutdown, and only when nothing else is in the air), sends it
through the delivery (whose retry loop tells :meth:`SenderThreads._pace` each attempt's
outcome, which feeds the concurrency limit), and settles it. Where no
thread may run, :meth:`SenderThreads._drain_here` does the same on the calling thread,
one batch at a time.

The methods read and write the transport's state under its lock (``_lock``, ``_queue``,
``_flights``, sequence numbers ``_left``/``_accepted``/``_release_to``); the subclasses
override ``_take_locked``/``_fly``/``_tick_locked``/``_wake_in_locked`` to take batches
from elsewhere (the spool). May import: the model, the delivery, the in-flight machinery.
"""

from __future__ import annotations

import functools
import threading
import time
from threading import Thread
from typing import TYPE_CHECKING, Any, Callable, Deque, Optional

from .._deadline import Deadline
from .._delivery import Outcome
from .._logging import log
from ._flights import Batch, Flights

if TYPE_CHECKING:
    from .._delivery import Delivery

__all__ = ["SenderThreads", "IDLE_RETIRE_S", "NO_THREAD", "INLINE_TIMEOUT_S"]

_monotonic = time.monotonic

#: How long a send on the caller's thread (no background thread here) may take.
INLINE_TIMEOUT_S = 5.0

#: A helper thread of the pool with nothing to send for this long (seconds) ends.
IDLE_RETIRE_S = 10.0


class _NoThread:
    """Marks a transport that drains on callers' threads."""

    def is_alive(self) -> bool:
        return False


NO_THREAD = _NoThread()

#: Decides, once per process, whether a background thread may run here.
ThreadPolicy = Callable[[], bool]


def _threads_allowed() -> bool:
    from .._runtime import background_threads_allowed

    return background_threads_allowed()


def _send_at_once() -> bool:
    from .._runtime import must_send_at_once

    return must_send_at_once()


class SenderThreads:
    """The sender threads' loop; see the module docstring. Not used on its own."""

    # the transport's state these methods use (declared for the type checker)
    _lock: threading.Lock
    _settled_cond: threading.Condition
    _waiting: int
    _drain_lock: Any
    _flights: Flights
    _queue: Deque[bytes]
    _accepted: int
    _left: int
    _release_to: int
    _next_due: float
    _stopping: bool
    _thread: Optional[object]
    _inline_each: bool
    _threads_option: Optional[bool]
    _worker_deadline: Deadline
    flush_interval: float
    max_batch_size: int
    max_queue_size: int

    if TYPE_CHECKING:

        @property
        def delivery(self) -> Delivery: ...

        def _report_overflow(self) -> None: ...

    def _start(self) -> object:
        with self._lock:
            if self._thread is not None:
                return self._thread
            allowed = self._threads_option if self._threads_option is not None else _threads_allowed()
            if not allowed:
                self._thread = NO_THREAD
                # e.g. a uWSGI master before it forks: nothing of ours runs there later
                self._inline_each = self._threads_option is None and _send_at_once()
                return NO_THREAD
            self._next_due = _monotonic() + self.flush_interval
            thread = self._flights.prepare_locked(functools.partial(self._work, True), name="klime-sender")
            self._thread = thread
        if self._flights.launch(thread):
            return thread
        with self._lock:  # "can't create new thread at interpreter shutdown"
            self._thread = NO_THREAD
        return NO_THREAD

    # ------------------------------------------------------------------ the senders

    def _work(self, primary: bool) -> None:
        """The loop of every sender thread. The primary one (``klime-sender``) also keeps
        the flush interval and never retires; helpers end after IDLE_RETIRE_S idle."""
        me = threading.current_thread()
        try:
            while True:
                self._report_overflow()
                batch, more = self._next(primary, me)
                if batch is None:
                    return
                for n in range(more):
                    if self._flights.spawn(functools.partial(self._work, False)) is None:
                        with self._lock:
                            self._flights.unwanted_locked(more - n - 1)
                        break
                self._fly(batch, self._worker_deadline)
        except BaseException:  # never expected; keep the books honest and say so
            with self._lock:
                if primary:
                    self._thread = NO_THREAD  # from now on, callers drain inline
                self._settled_cond.notify_all()  # a waiting flush must not wait for a dead thread
            log.exception("klime: a sender thread stopped unexpectedly")
            raise
        finally:
            with self._lock:
                self._flights.retire_locked(me)

    def _next(self, primary: bool, me: Thread) -> tuple[Optional[Batch], int]:
        """Wait for a batch this thread may send: (batch, how many more threads to start),
        or (None, 0) when this thread should end."""
        flights = self._flights
        idle_since: Optional[float] = None
        with self._lock:
            while True:
                now = _monotonic()
                if now >= self._next_due:
                    self._tick_locked(now)
                if self._stopping and (
                    self._worker_deadline.expired() or not (self._queue or flights.deferred)
                ):
                    return None, 0
                batch = self._take_locked()
                if batch is not None:
                    more = self._takeable_locked()
                    if more and flights.idle:
                        flights.work.notify()  # another batch may go: an idle thread takes it
                    return batch, flights.threads_wanted_locked(more)
                if primary:
                    timeout = self._next_due - now
                    if self._stopping:
                        timeout = min(timeout, 0.05)
                else:
                    if self._stopping or len(flights.threads) > flights.ceiling_locked():
                        return None, 0  # stopping (or, never expected, above the ceiling)
                    if idle_since is None:
                        idle_since = now
                    timeout = idle_since + IDLE_RETIRE_S - now
                    if timeout <= 0:
                        return None, 0
                    timeout = min(timeout, self._next_due - now)
                flights.idle += 1
                try:
                    flights.work.wait(max(0.0, min(timeout, self._wake_in_locked())))
                finally:
                    flights.idle -= 1

    def _tick_locked(self, now: float) -> None:
        """The flush interval came: partial batches may go."""
        self._release_to = max(self._release_to, self._accepted)
        self._next_due = now + self.flush_interval

    def _wake_in_locked(self) -> float:
        """Seconds until something becomes due that no event will announce (none here)."""
        return 3600.0

    def _take_locked(self) -> Optional[Batch]:
        """The next batch that may take off now, already counted as in the air; deferred
        batches first. A full batch goes while the limit allows; a partial one only when
        released (interval, flush, shutdown) and nothing else is in the air."""
        flights = self._flights
        if flights.deferred:
            return flights.take_deferred_locked()
        queue = self._queue
        waiting = len(queue)
        if not waiting:
            return None
        size = self.max_batch_size
        if waiting >= size:
            if not flights.room_locked():
                return None
            n = size
        else:
            if flights.flying or not (self._stopping or self._left < self._release_to):
                return None
            n = waiting
        popleft = queue.popleft
        batch = Batch(self._left, [popleft() for _ in range(n)])
        self._left += n
        return flights.mark_sending_locked(batch)

    def _takeable_locked(self) -> int:
        """How many more batches could take off now (deferred ones, full ones waiting),
        within the limit."""
        flights = self._flights
        room = flights.limit.limit - len(flights.flying)
        waiting = len(flights.deferred) + len(self._queue) // self.max_batch_size
        return max(0, min(room, waiting))

    def _fly(self, batch: Batch, deadline: Deadline) -> None:
        """Send one batch (blocks); settle it; deferred events wait, first in line."""
        try:
            self.delivery.send(
                batch.events,
                deadline,
                settle=functools.partial(self._settle, batch),
                pace=functools.partial(self._pace, batch),
                retry=batch.retry,
            )
        except Exception:  # Delivery never raises; if it does, the batch is not lost silently
            log.exception("klime: sending a batch failed unexpectedly")
            with self._lock:
                orphan = self._flights.settle_locked(batch, [], batch.retry, None)
            if orphan:
                self.delivery.fail(batch.events, "an unexpected error happened while sending")
        finally:
            if self._waiting:  # a flush waits: let it look (without one, no lock to take)
                with self._lock:
                    self._settled_cond.notify_all()
        self._report_overflow()

    def _wait_settled_locked(self, timeout: Optional[float]) -> None:
        """Wait on ``_settled_cond`` (held by the caller) until a batch settles or
        ``timeout``, counted as a waiter: without one, the senders skip the notify."""
        self._waiting += 1
        try:
            self._settled_cond.wait(timeout)
        finally:
            self._waiting -= 1

    def _settle(self, batch: Batch, outcome: Outcome) -> bool:
        """Called by Delivery just before it counts a batch's outcome: the batch leaves the
        air at that instant (so ``stats()`` never counts it twice), unless a shutdown
        already gave up on it and accounted for it."""
        with self._lock:
            return self._flights.settle_locked(
                batch, outcome.unsent or [], outcome.retry, outcome.last_error
            )

    def _pace(self, batch: Batch, outcome: str, seconds: float) -> bool:
        """One attempt's outcome, told by the retry loop: feeds the concurrency limit.
        After a transient failure, False defers the batch (more in flight than allowed)."""
        limit = self._flights.limit
        drops_near = 2 * len(self._queue) >= self.max_queue_size  # drops are near
        if not drops_near and limit.note_fast_success(outcome, seconds):  # one at a time, fast: no lock
            return True
        with self._lock:
            flights = self._flights
            backlog = len(flights.deferred) + len(self._queue) // self.max_batch_size
            return flights.pace_locked(outcome, seconds, backlog=backlog, drops_near=drops_near)

    def _drain_here(self, deadline: Deadline, *, release: bool) -> None:
        """Send from the calling thread, one batch at a time, until nothing may go (or the
        deadline). ``release``: partial batches too, up to everything queued now."""
        self._report_overflow()
        with self._drain_lock:
            if release:
                with self._lock:
                    self._release_to = max(self._release_to, self._accepted)
            while not deadline.expired():
                with self._lock:
                    batch = self._take_locked()
                if batch is None:
                    return
                self._fly(batch, deadline)

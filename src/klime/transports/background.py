"""The background transport: a bounded queue drained by klime's own daemon threads.

The default outside serverless. ``submit`` appends to a deque under a lock held for
microseconds and returns. A named daemon thread (``klime-sender``), started on the first
event of each process, sends a batch every ``flush_interval`` ms or as soon as
``max_batch_size`` events wait, back to back while a backlog remains. When a backlog
waits and round trips are slow, more requests fly at once, on more threads of a bounded
pool (``klime-sender-2``, ...; at most ``max_concurrent_requests``), started only then and
retired after :data:`IDLE_RETIRE_S` without work; how many is decided by the server's
answers (:mod:`klime.transports._flights`). With less than a batch waiting, one request
at a time.

Where no thread can run (uWSGI without threads, a uWSGI master, interpreter shutdown) the
same queue is drained on the caller's thread instead: at ``max_batch_size`` events, and by
``flush``. At exit the flushing thread sends batches too, beside the pool (on Python 3.12+
no new thread may start then).

Book-keeping: every event gets a sequence number when queued. Events leave the queue in
that order, either taken into a batch or dropped as the oldest on overflow, so "everything
queued before this call is resolved" is a comparison of sequence numbers (see
:meth:`BackgroundTransport._settled`); a batch remembers the number of its first event
while it is in the air or deferred.

The sender threads: each takes a batch (deferred ones first; a full one while the limit
allows; a partial one only when released by the interval, a flush or the shutdown, and
only when nothing else is in the air), sends it through the delivery (whose retry loop
tells :meth:`BackgroundTransport._pace` each attempt's outcome, which feeds the
concurrency limit), and settles it. The first, ``klime-sender``, keeps the flush interval
and never retires; helpers end after :data:`IDLE_RETIRE_S` idle or when more are running
than the limit needs. Where no thread may run, :meth:`BackgroundTransport._drain_here`
does the same on the calling thread, one batch at a time. The spool transport overrides
``_take_locked``/``_fly``/``_tick_locked``/``_wake_in_locked`` to take batches from disk.
May import: the model, the delivery and its ledger, the in-flight machinery.
"""

from __future__ import annotations

import functools
import sys
import threading
import time
from collections import deque
from threading import Thread
from typing import Deque, Dict, List, Optional

from .._config import (
    DEFAULT_FLUSH_INTERVAL_MS,
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_CONCURRENT_REQUESTS,
    DEFAULT_MAX_QUEUE_SIZE,
)
from .._deadline import Deadline
from .._delivery import Outcome
from .._ledger import Tally
from .._logging import log
from .._models import FlushResult
from ._dropped import DroppedEvents
from ._flights import Batch, Flights
from .base import Transport

__all__ = ["BackgroundTransport"]

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

def _threads_allowed() -> bool:
    from .._runtime import background_threads_allowed

    return background_threads_allowed()


def _send_at_once() -> bool:
    from .._runtime import must_send_at_once

    return must_send_at_once()


class BackgroundTransport(Transport):
    """Queue in the caller's thread, send from klime's background threads.

    Args:
        flush_interval: milliseconds between flushes of a partial batch (Ruby SDK parity).
        max_batch_size: events per batch (1..100); a full batch is sent at once.
        max_queue_size: queued events at most; beyond it the OLDEST event is dropped,
            counted, and handed to ``on_error`` (in batches, one warning per episode).
        max_concurrent_requests: requests in flight at once at most (and threads sending
            them); reached only under a backlog with slow round trips.
        threads: force (True) or forbid (False) the background thread; by default it is
            used unless the runtime cannot run Python threads (see :mod:`klime._runtime`).

    ``submit`` is thread-safe and never blocks on I/O. ``flush``/``shutdown`` are
    thread-safe and honour one deadline across HTTP timeouts, retries and backoff sleeps.
    """

    name = "background"

    def __init__(
        self,
        *,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL_MS,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE,
        max_concurrent_requests: int = DEFAULT_MAX_CONCURRENT_REQUESTS,
        threads: Optional[bool] = None,
    ) -> None:
        self.flush_interval = float(flush_interval) / 1000.0
        self.max_batch_size = max(1, min(100, int(max_batch_size)))
        self.max_queue_size = max(1, int(max_queue_size))
        self.max_concurrent_requests = max(1, int(max_concurrent_requests))
        self._threads_option = threads
        self._reset()

    def _reset(self) -> None:
        closed = getattr(self, "_closed", False)  # a client shut down before a fork stays shut
        self._lock = threading.Lock()
        self._settled_cond = threading.Condition(self._lock)
        self._waiting = 0  # flushes waiting on _settled_cond (senders skip the notify without)
        self._drain_lock = threading.RLock()  # re-entered by a flush() inside a callback
        self._flights = Flights(self._lock, ceiling=self.max_concurrent_requests, name="klime-sender")
        self._queue: Deque[bytes] = deque()
        self._accepted = 0
        self._left = 0  # events that have left the queue (batched or dropped), in order
        self._release_to = 0  # events numbered below this may go in a partial batch
        self._next_due = 0.0  # when the next interval flush is due (monotonic)
        self._drops = DroppedEvents(
            self._lock,
            self._settled_cond,
            max_queue_size=self.max_queue_size,
            delivery=lambda: self.delivery,
            queue_has_room=lambda: len(self._queue) < self.max_queue_size,
            stopping=lambda: self._stopping,
        )
        self._closed = closed
        self._stopping = False
        self._thread: Optional[object] = None  # the first sender thread, or NO_THREAD
        self._inline_each = False  # no thread, and no later moment to send: send every event
        self._worker_deadline = Deadline()

    def after_fork(self) -> None:
        self._reset()

    # ------------------------------------------------------------------ hot path

    def submit(self, event: bytes) -> bool:
        """Queue one event. Thread-safe; returns in microseconds (no I/O)."""
        with self._lock:
            if self._closed:
                return False
            queue = self._queue
            overflow = len(queue) >= self.max_queue_size
            if overflow:
                self._drop_oldest_locked()
            queue.append(event)
            self._accepted += 1
            size = len(queue)
            thread = self._thread
            if size % self.max_batch_size == 0:
                self._full_batch_locked()
        if thread is None:
            thread = self._start()
        if thread is NO_THREAD:
            if self._inline_each or size >= self.max_batch_size or overflow:
                # bounded: an unreachable endpoint must not stall the caller for the whole
                # retry budget (what is not sent in time is reported, not kept)
                self._drain_here(Deadline.after(INLINE_TIMEOUT_S), release=self._inline_each)
        elif overflow:
            self._drops.report_soon()
        return True

    def _full_batch_locked(self) -> None:
        """A full batch waits in the queue (the caller's thread, holding the lock)."""
        flights = self._flights
        if flights.idle and not flights.flying:
            # nobody in the air who would come back for it (while requests are in the air,
            # the sender threads wake each other)
            flights.work.notify()

    def _drop_oldest_locked(self) -> None:
        """The queue is full: drop its oldest event, count it in the ledger, and keep it
        for ``on_error`` unless nobody would receive it. Microseconds; the caller's thread."""
        delivery = self._delivery
        keep = delivery is not None and delivery.has_error_callback()
        self._drops.add_locked(self._queue.popleft(), self._left, keep=keep)
        self._left += 1
        if delivery is not None:
            delivery.ledger.dropped_for_room_locked()

    def _report_overflow(self) -> None:
        """Hand events dropped for room to ``on_error`` (see :mod:`._dropped`). Thread-safe."""
        self._drops.report()

    # ------------------------------------------------------------------ flush / shutdown

    def _settled(self, target: int) -> bool:
        """Are all events with sequence number < ``target`` resolved? (Hold the lock.)"""
        return (
            self._left >= target
            and self._flights.settled_locked(target)
            and self._drops.settled_locked(target)
        )

    def _unsettled(self, target: int) -> int:
        """How many events with sequence number < ``target`` are unresolved. (Hold the lock.)"""
        return (
            max(0, target - self._left)
            + self._flights.unsettled_locked(target)
            + self._drops.unsettled_locked(target)
        )

    def _snapshot(self) -> Tally:
        return self.delivery.ledger.tally()

    def _worker_alive(self) -> bool:
        thread = self._thread
        return thread is not None and thread is not NO_THREAD and thread.is_alive()  # type: ignore[attr-defined]

    def _own_thread(self) -> bool:
        current = threading.current_thread()
        return current is self._drops.reporter or current in self._flights.alive()

    def _wait_settled(self, deadline: Deadline, *, help: bool = False) -> FlushResult:
        """Wait until everything queued so far is resolved (or the deadline). ``help``:
        send batches from this thread too (at shutdown, where the deadline is final)."""
        before = self._snapshot()
        with self._lock:
            target = self._accepted
            self._release_to = max(self._release_to, target)
        if self._own_thread():
            # flush() from inside a callback, on klime's own thread: it cannot wait for
            # itself. The events go out as soon as the callback returns.
            with self._lock:
                unsent = self._unsettled(target)
            return FlushResult(unsent=unsent)
        if self._worker_alive():
            with self._lock:
                self._flights.work.notify_all()
            while True:
                if help:
                    self._drain_here(deadline, release=False)
                with self._settled_cond:
                    if self._settled(target):
                        break
                    left = deadline.remaining()
                    if left is not None and left <= 0:
                        break
                    self._wait_settled_locked(left)
                if not self._worker_alive():
                    break
        if not self._worker_alive():
            self._drain_here(deadline, release=True)
        with self._lock:
            unsent = self._unsettled(target)
        return self.delivery.ledger.result_since(before, unsent=unsent, expired=deadline.expired())

    def flush(self, timeout: Optional[float] = None) -> FlushResult:
        """Block until every event queued before the call is sent or reported, or until
        ``timeout`` seconds. Thread-safe. Returns what happened meanwhile."""
        return self._wait_settled(Deadline.after(timeout))

    def shutdown(self, timeout: Optional[float] = None, *, flush: bool = True) -> FlushResult:
        """Flush (if ``flush``), stop the threads, report what is left. Idempotent.

        Everything is counted when this returns; a batch whose retry the deadline cut short
        is handed to ``on_error`` by its own sender thread, which may do so just after."""
        deadline = Deadline.after(timeout)
        with self._lock:
            if self._closed:
                return FlushResult()
            self._closed = True
            if not flush:
                leftovers = list(self._queue)
                self._queue.clear()
                self._left += len(leftovers)
                parked = list(self._flights.deferred)
                self._flights.deferred.clear()
            else:
                leftovers, parked = [], []
        before = self._snapshot()
        self._worker_deadline.tighten(deadline.at if flush else _monotonic())
        if flush:
            self._wait_settled(deadline, help=True)
        self._stop_threads(deadline)
        return self._finish_shutdown(deadline, before, flush, leftovers, parked)

    def _stop_threads(self, deadline: Deadline) -> None:
        """Tell every thread of ours to stop; wait for them until the deadline."""
        with self._lock:
            self._stopping = True
            self._release_to = sys.maxsize
            self._flights.work.notify_all()
        self._drops.wake.set()
        current = threading.current_thread()
        for thread in self._flights.alive():
            if thread is not current:
                thread.join(deadline.remaining())

    def _finish_shutdown(
        self,
        deadline: Deadline,
        before: Tally,
        flush: bool,
        leftovers: List[bytes],
        parked: List[Batch],
    ) -> FlushResult:
        """Report what is left (queued, in the air, deferred) and sum up the shutdown."""
        with self._lock:
            leftovers += list(self._queue)
            self._left += len(self._queue)
            self._queue.clear()
            abandoned, deferred = self._flights.abandon_locked()
            parked += deferred
        self._report_overflow()
        for batch in abandoned:
            self.delivery.fail(batch.events, "shutdown deadline reached while this batch was being sent")
        for batch in parked:
            why = f" after: {batch.error}" if batch.error is not None else ""
            self.delivery.fail(batch.events, f"shutdown deadline reached while retrying{why}")
        if leftovers:
            reason = (
                "shutdown deadline reached before the event was sent"
                if flush
                else "client shut down with flush_on_shutdown=False; event not sent"
            )
            self.delivery.drop(leftovers, reason)
        after = self._snapshot()
        with self._lock:
            unsent = len(self._queue) + self._flights.held_locked()
        lost = after.failed + after.dropped > before.failed + before.dropped
        timed_out = deadline.expired() and bool(leftovers or abandoned or parked or lost)
        return self.delivery.ledger.result_since(before, unsent=unsent, timed_out=timed_out)

    def counts(self) -> Dict[str, int]:
        with self._lock:
            pending = len(self._queue) + self._flights.held_locked()
            return {"accepted": self._accepted, "pending": pending}

    def in_flight(self) -> Dict[str, int]:
        """What is being sent now: requests in the air, deferred batches, sender threads and
        the adaptive limit. For tests and debugging; thread-safe, non-blocking."""
        with self._lock:
            flights = self._flights
            return {
                "requests": len(flights.flying),
                "deferred": len(flights.deferred),
                "threads": len(flights.threads),
                "limit": flights.limit.limit,
            }

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

    # ------------------------------------------------------------------ the sender threads

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

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
"""

from __future__ import annotations

import functools
import os
import sys
import threading
import time
from collections import deque
from threading import Thread
from typing import Callable, Deque, Dict, List, Optional

from .._config import (
    DEFAULT_FLUSH_INTERVAL_MS,
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_CONCURRENT_REQUESTS,
    DEFAULT_MAX_QUEUE_SIZE,
)
from .._deadline import Deadline
from .._delivery import Outcome
from .._logging import log
from .._models import FlushResult
from ._flights import Batch, Flights
from .base import Transport

__all__ = ["BackgroundTransport", "IDLE_RETIRE_S"]

_monotonic = time.monotonic

#: How long a send on the caller's thread (no background thread here) may take.
_INLINE_TIMEOUT_S = 5.0

#: Dropped events are handed to on_error at most this many at a time.
_REPORT_SLICE = 1000

#: A helper thread of the pool with nothing to send for this long (seconds) ends.
IDLE_RETIRE_S = 10.0

#: The loss episode of a full queue (see klime._logging).
EPISODE_OVERFLOW = "loss-overflow"


class _NoThread:
    """Marks a transport that drains on callers' threads."""

    def is_alive(self) -> bool:
        return False


_NO_THREAD = _NoThread()

#: Decides, once per process, whether a background thread may run here.
ThreadPolicy = Callable[[], bool]


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
        self._drain_lock = threading.RLock()  # re-entered by a flush() inside a callback
        self._flights = Flights(self._lock, ceiling=self.max_concurrent_requests, name="klime-sender")
        self._queue: Deque[bytes] = deque()
        self._accepted = 0
        self._left = 0  # events that have left the queue (batched or dropped), in order
        self._release_to = 0  # events numbered below this may go in a partial batch
        self._next_due = 0.0  # when the next interval flush is due (monotonic)
        self._overflow: List[bytes] = []  # dropped (and counted), not yet reported
        self._overflow_unheld = 0  # dropped with nobody to hand them to: counted, not kept
        self._dropped = 0
        self._overflow_first = 0
        self._reporting: List[int] = []  # first sequence numbers of reports in progress
        self._overflow_episode = 0
        self._reporter: Optional[Thread] = None
        self._report_wake = threading.Event()
        self._closed = closed
        self._stopping = False
        self._thread: Optional[object] = None  # the first sender thread, or _NO_THREAD
        self._inline_each = False  # no thread, and no later moment to send: send every event
        self._worker_deadline = Deadline()
        self._pid = os.getpid()

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
                oldest = queue.popleft()
                if self._keep_dropped():
                    if not self._overflow:
                        self._overflow_first = self._left
                    self._overflow.append(oldest)
                else:
                    self._overflow_unheld += 1
                self._left += 1
                self._dropped += 1
            queue.append(event)
            self._accepted += 1
            size = len(queue)
            thread = self._thread
            if size % self.max_batch_size == 0:
                self._full_batch_locked()
        if thread is None:
            thread = self._start()
        if thread is _NO_THREAD:
            if self._inline_each or size >= self.max_batch_size or overflow:
                # bounded: an unreachable endpoint must not stall the caller for the whole
                # retry budget (what is not sent in time is reported, not kept)
                self._drain_here(Deadline.after(_INLINE_TIMEOUT_S), release=self._inline_each)
        elif overflow:
            self._report_soon()
        return True

    def _full_batch_locked(self) -> None:
        """A full batch waits in the queue (the caller's thread, holding the lock)."""
        flights = self._flights
        if flights.idle and not flights.flying:
            # nobody in the air who would come back for it (while requests are in the air,
            # the sender threads wake each other)
            flights.work.notify()

    def _keep_dropped(self) -> bool:
        """Keep a dropped event for ``on_error``? Not when nobody would receive it."""
        delivery = self._delivery
        return delivery is not None and delivery.has_error_callback()

    def _report_soon(self) -> None:
        """Have dropped events reported now, even while every sender thread is stuck in a
        request: by a second daemon thread, started at the first overflow."""
        reporter = self._reporter
        if reporter is None:
            with self._lock:
                reporter = self._reporter
                if reporter is None:
                    reporter = self._reporter = Thread(
                        target=self._run_reporter, name="klime-reporter", daemon=True
                    )
                else:
                    reporter = None
            if reporter is not None:
                try:
                    reporter.start()
                except RuntimeError:  # interpreter shutdown: the next drain reports them
                    return
        self._report_wake.set()

    def _run_reporter(self) -> None:
        while True:
            self._report_wake.wait()
            self._report_wake.clear()
            try:
                self._report_overflow()
            except Exception:  # never expected (callbacks are guarded)
                log.exception("klime: reporting dropped events failed")
            with self._lock:
                if self._stopping and not self._overflow:
                    return

    def _start(self) -> object:
        with self._lock:
            if self._thread is not None:
                return self._thread
            allowed = self._threads_option if self._threads_option is not None else _threads_allowed()
            if not allowed:
                self._thread = _NO_THREAD
                # e.g. a uWSGI master before it forks: nothing of ours runs there later
                self._inline_each = self._threads_option is None and _send_at_once()
                return _NO_THREAD
            self._next_due = _monotonic() + self.flush_interval
            thread = self._flights.prepare_locked(functools.partial(self._work, True), name="klime-sender")
            self._thread = thread
        if self._flights.launch(thread):
            return thread
        with self._lock:  # "can't create new thread at interpreter shutdown"
            self._thread = _NO_THREAD
        return _NO_THREAD

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
                for _ in range(more):
                    if self._flights.spawn(functools.partial(self._work, False)) is None:
                        break
                self._fly(batch, self._worker_deadline)
        except BaseException:  # never expected; keep the books honest and say so
            with self._lock:
                if primary:
                    self._thread = _NO_THREAD  # from now on, callers drain inline
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
                    self._worker_deadline.expired() or not (self._queue or flights.parked)
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
                    if self._stopping or len(flights.threads) > flights.limit.limit:
                        return None, 0  # nothing to do, or more threads than the limit needs
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
        if flights.parked:
            return flights.take_parked_locked()
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
        return flights.board_locked(batch)

    def _takeable_locked(self) -> int:
        """How many more batches could take off now (deferred ones, full ones waiting),
        within the limit."""
        flights = self._flights
        room = flights.limit.limit - len(flights.flying)
        waiting = len(flights.parked) + len(self._queue) // self.max_batch_size
        return max(0, min(room, waiting))

    def _fly(self, batch: Batch, deadline: Deadline) -> None:
        """Send one batch (blocks); settle it; deferred events wait, first in line."""
        try:
            self.delivery.send(
                batch.events,
                deadline,
                claim=functools.partial(self._land, batch),
                feedback=functools.partial(self._feedback, batch),
                attempts_made=batch.attempts,
            )
        except Exception:  # Delivery never raises; if it does, the batch is not lost silently
            log.exception("klime: sending a batch failed unexpectedly")
            with self._lock:
                orphan = self._flights.land_locked(batch, [], 0, None)
            if orphan:
                self.delivery.fail(batch.events, "an unexpected error happened while sending")
        finally:
            with self._lock:
                self._settled_cond.notify_all()
        self._report_overflow()

    def _land(self, batch: Batch, outcome: Outcome) -> bool:
        """Called by Delivery just before it counts a batch's outcome: the batch leaves the
        air at that instant (so ``stats()`` never counts it twice), unless a shutdown
        already gave up on it and accounted for it."""
        with self._lock:
            return self._flights.land_locked(
                batch, outcome.unsent or [], outcome.attempts, outcome.last_error
            )

    def _feedback(self, batch: Batch, outcome: str, seconds: float) -> bool:
        with self._lock:
            flights = self._flights
            backlog = len(flights.parked) + len(self._queue) // self.max_batch_size
            return flights.feedback_locked(outcome, seconds, backlog=backlog)

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

    def _report_overflow(self) -> None:
        """Hand dropped events to ``on_error``, at most ``_REPORT_SLICE`` per call; warn at
        the start of an overflow episode (stderr too without logging) and log its end.
        Thread-safe."""
        while True:
            with self._lock:
                dropped = self._overflow
                unheld, self._overflow_unheld = self._overflow_unheld, 0
                if not dropped and not unheld:
                    if self._overflow_episode and len(self._queue) < self.max_queue_size:
                        total, self._overflow_episode = self._overflow_episode, 0
                        log.end_episode(EPISODE_OVERFLOW)
                        log.warning("klime: the queue has room again; %d events were dropped", total)
                    return
                if len(dropped) > _REPORT_SLICE:  # bound the memory and GIL time of one report
                    dropped, self._overflow = dropped[:_REPORT_SLICE], dropped[_REPORT_SLICE:]
                    first = self._overflow_first
                    # a lower bound of the next one's sequence number: flush may wait a
                    # little longer, never return early
                    self._overflow_first = first + _REPORT_SLICE
                else:
                    self._overflow = []
                    first = self._overflow_first
                self._reporting.append(first)
                self._overflow_episode += len(dropped) + unheld
            try:
                log.notice(
                    EPISODE_OVERFLOW,
                    "klime: the queue is full (max_queue_size=%d): events are being dropped, "
                    "oldest first, and reported to on_error. The endpoint is slower than "
                    "the events come (or unreachable); raise max_queue_size or "
                    "max_concurrent_requests, or check the endpoint",
                    self.max_queue_size,
                )
                reason = f"queue full (max_queue_size={self.max_queue_size}); event dropped"
                if dropped:
                    self.delivery.drop(dropped, reason, counted=True, notice=False)
                if unheld:
                    log.error("klime: %d events not delivered: %s", unheld, reason)
            finally:
                with self._lock:
                    self._reporting.remove(first)
                    self._settled_cond.notify_all()

    # ------------------------------------------------------------------ flush / shutdown

    def _settled(self, target: int) -> bool:
        """Are all events with sequence number < ``target`` resolved? (Hold the lock.)"""
        return (
            self._left >= target
            and self._flights.settled_locked(target)
            and (not self._overflow or self._overflow_first >= target)
            and all(first >= target for first in self._reporting)
        )

    def _unsettled(self, target: int) -> int:
        """How many events with sequence number < ``target`` are unresolved. (Hold the lock.)"""
        count = max(0, target - self._left) + self._flights.unsettled_locked(target)
        if self._overflow and self._overflow_first < target:
            count += min(len(self._overflow), target - self._overflow_first)
        return count

    def _snapshot(self) -> Dict[str, int]:
        counters = self.delivery.counters()
        counters["dropped"] += self._dropped
        return counters

    def _worker_alive(self) -> bool:
        thread = self._thread
        return thread is not None and thread is not _NO_THREAD and thread.is_alive()  # type: ignore[attr-defined]

    def _own_thread(self) -> bool:
        current = threading.current_thread()
        return current is self._reporter or current in self._flights.alive()

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
                    self._settled_cond.wait(left)
                if not self._worker_alive():
                    break
        if not self._worker_alive():
            self._drain_here(deadline, release=True)
        with self._lock:
            unsent = self._unsettled(target)
        after = self._snapshot()
        return FlushResult(
            sent=after["sent"] - before["sent"],
            failed=after["failed"] - before["failed"],
            dropped=after["dropped"] - before["dropped"],
            unsent=unsent,
            timed_out=unsent > 0 and deadline.expired(),
        )

    def flush(self, timeout: Optional[float] = None) -> FlushResult:
        """Block until every event queued before the call is sent or reported, or until
        ``timeout`` seconds. Thread-safe. Returns what happened meanwhile."""
        return self._wait_settled(Deadline.after(timeout))

    def shutdown(self, timeout: Optional[float] = None, *, flush: bool = True) -> FlushResult:
        """Flush (if ``flush``), stop the threads, report what is left. Idempotent."""
        deadline = Deadline.after(timeout)
        with self._lock:
            if self._closed:
                return FlushResult()
            self._closed = True
            if not flush:
                leftovers = list(self._queue)
                self._queue.clear()
                self._left += len(leftovers)
                parked = list(self._flights.parked)
                self._flights.parked.clear()
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
        self._report_wake.set()
        current = threading.current_thread()
        for thread in self._flights.alive():
            if thread is not current:
                thread.join(deadline.remaining())

    def _finish_shutdown(
        self,
        deadline: Deadline,
        before: Dict[str, int],
        flush: bool,
        leftovers: List[bytes],
        parked: List[Batch],
    ) -> FlushResult:
        """Report what is left (queued, in the air, deferred) and sum up the shutdown."""
        lost_before = before["failed"] + before["dropped"]
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
        return FlushResult(
            sent=after["sent"] - before["sent"],
            failed=after["failed"] - before["failed"],
            dropped=after["dropped"] - before["dropped"],
            unsent=unsent,
            timed_out=deadline.expired()
            and bool(leftovers or abandoned or parked or after["failed"] + after["dropped"] > lost_before),
        )

    def counts(self) -> Dict[str, int]:
        with self._lock:
            pending = len(self._queue) + self._flights.held_locked()
            return {"accepted": self._accepted, "pending": pending, "dropped": self._dropped}

    def in_flight(self) -> Dict[str, int]:
        """What is being sent now: requests in the air, deferred batches, sender threads and
        the adaptive limit. For tests and debugging; thread-safe, non-blocking."""
        with self._lock:
            flights = self._flights
            return {
                "requests": len(flights.flying),
                "deferred": len(flights.parked),
                "threads": len(flights.threads),
                "limit": flights.limit.limit,
            }

"""The background transport: a bounded queue drained by one daemon thread.

The default outside serverless. ``submit`` appends to a deque under a lock held for
microseconds and returns; one named daemon thread (``klime-sender``), started on the first
event of each process, sends a batch every ``flush_interval`` ms or as soon as
``max_batch_size`` events wait, back to back while a backlog remains.

Where no thread can run (uWSGI without threads, interpreter shutdown) the same queue is
drained on the caller's thread instead: at ``max_batch_size`` events, and by ``flush``.

Book-keeping: every event gets a sequence number when queued. Events leave the queue in
that order, either popped into a batch or dropped as the oldest on overflow, so "everything
queued before this call is resolved" is a comparison of sequence numbers (see
:meth:`BackgroundTransport._settled`).
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from threading import Thread
from typing import Callable, Deque, Dict, List, Optional

from .._config import DEFAULT_FLUSH_INTERVAL_MS, DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_QUEUE_SIZE
from .._deadline import Deadline
from .._logging import log
from .._models import FlushResult
from .base import Transport

__all__ = ["BackgroundTransport"]

_monotonic = time.monotonic

#: Dropped events are handed to on_error at most this many at a time.
_REPORT_SLICE = 1000


class _Claim:
    """Who settles an in-flight batch: its sender, or a shutdown that gave up waiting."""

    __slots__ = ("_lock", "_taken")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._taken = False

    def take(self) -> bool:
        with self._lock:
            if self._taken:
                return False
            self._taken = True
            return True


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


class BackgroundTransport(Transport):
    """Queue in the caller's thread, send from a background thread.

    Args:
        flush_interval: milliseconds between flushes of a partial batch (Ruby SDK parity).
        max_batch_size: events per batch (1..100); a full batch is sent at once.
        max_queue_size: queued events at most; beyond it the OLDEST event is dropped,
            counted, and handed to ``on_error`` (in batches, one warning per episode).
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
        threads: Optional[bool] = None,
    ) -> None:
        self.flush_interval = float(flush_interval) / 1000.0
        self.max_batch_size = max(1, min(100, int(max_batch_size)))
        self.max_queue_size = max(1, int(max_queue_size))
        self._threads_option = threads
        self._reset()

    def _reset(self) -> None:
        closed = getattr(self, "_closed", False)  # a client shut down before a fork stays shut
        self._lock = threading.Lock()
        self._settled_cond = threading.Condition(self._lock)
        self._drain_lock = threading.Lock()
        self._wake = threading.Event()
        self._queue: Deque[bytes] = deque()
        self._accepted = 0
        self._left = 0  # events that have left the queue (batched or dropped), in order
        self._inflight: Optional[_Claim] = None
        self._inflight_start = 0
        self._inflight_events: List[bytes] = []
        self._overflow: List[bytes] = []  # dropped (and counted), not yet reported
        self._dropped = 0
        self._overflow_first = 0
        self._overflow_reporting: Optional[int] = None
        self._overflow_episode = 0
        self._flush_requests = 0
        self._closed = closed
        self._stopping = False
        self._thread: Optional[object] = None
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
                if not self._overflow:
                    self._overflow_first = self._left
                self._overflow.append(queue.popleft())
                self._left += 1
                self._dropped += 1
            queue.append(event)
            self._accepted += 1
            size = len(queue)
            thread = self._thread
        if thread is None:
            thread = self._start()
        if thread is _NO_THREAD:
            if size >= self.max_batch_size or overflow:
                self._drain_inline(Deadline(), full=False)
        elif size == self.max_batch_size or overflow:
            self._wake.set()
        return True

    def _start(self) -> object:
        with self._lock:
            if self._thread is not None:
                return self._thread
            allowed = self._threads_option if self._threads_option is not None else _threads_allowed()
            if not allowed:
                self._thread = _NO_THREAD
                return _NO_THREAD
            thread = Thread(target=self._run, name="klime-sender", daemon=True)
            self._thread = thread
        try:
            thread.start()
        except RuntimeError:  # "can't create new thread at interpreter shutdown"
            with self._lock:
                self._thread = _NO_THREAD
            return _NO_THREAD
        return thread

    # ------------------------------------------------------------------ the worker

    def _run(self) -> None:
        interval = self.flush_interval
        next_due = _monotonic() + interval
        try:
            while True:
                self._wake.wait(max(0.0, next_due - _monotonic()))
                self._wake.clear()
                self._report_overflow()
                with self._lock:
                    stopping = self._stopping
                    full = stopping or self._flush_requests > 0 or _monotonic() >= next_due
                if full:
                    next_due = _monotonic() + interval
                self._drain(self._worker_deadline, full=full)
                with self._lock:
                    if self._stopping and (not self._queue or self._worker_deadline.expired()):
                        return
        except BaseException:  # never expected; keep the books honest and say so
            log.exception("klime: the sender thread stopped unexpectedly")
            with self._lock:
                self._thread = _NO_THREAD
            raise

    def _drain(self, deadline: Deadline, *, full: bool) -> None:
        """Send batches until the queue is empty (``full``) or holds less than a batch."""
        batch_size = self.max_batch_size
        with self._drain_lock:
            while True:
                with self._lock:
                    queue = self._queue
                    if not queue or (not full and len(queue) < batch_size) or deadline.expired():
                        return
                    n = min(batch_size, len(queue))
                    popleft = queue.popleft
                    batch = [popleft() for _ in range(n)]
                    claim = _Claim()
                    self._inflight = claim
                    self._inflight_start = self._left
                    self._inflight_events = batch
                    self._left += n
                try:
                    self.delivery.send(batch, deadline, claim=claim.take)
                finally:
                    with self._lock:
                        if self._inflight is claim:
                            self._inflight = None
                            self._inflight_events = []
                        self._settled_cond.notify_all()
                self._report_overflow()

    def _drain_inline(self, deadline: Deadline, *, full: bool) -> None:
        self._report_overflow()
        self._drain(deadline, full=full)

    def _report_overflow(self) -> None:
        with self._lock:
            dropped = self._overflow
            if not dropped:
                if self._overflow_episode and len(self._queue) < self.max_queue_size:
                    total, self._overflow_episode = self._overflow_episode, 0
                    log.warning("klime: the queue has room again; %d events were dropped", total)
                return
            if len(dropped) > _REPORT_SLICE:  # bound the memory and GIL time of one report
                dropped, self._overflow = dropped[:_REPORT_SLICE], dropped[_REPORT_SLICE:]
                reporting, self._overflow_first = self._overflow_first, self._overflow_first + _REPORT_SLICE
            else:
                self._overflow = []
                reporting = self._overflow_first
            self._overflow_reporting = reporting
            first_of_episode = self._overflow_episode == 0
            self._overflow_episode += len(dropped)
        try:
            if first_of_episode:
                log.warning(
                    "klime: the queue is full (max_queue_size=%d); dropping the oldest events "
                    "and reporting them to on_error. Raise max_queue_size, or check that the "
                    "endpoint is reachable",
                    self.max_queue_size,
                )
            self.delivery.drop(
                dropped,
                f"queue full (max_queue_size={self.max_queue_size}); event dropped",
                counted=True,
            )
        finally:
            with self._lock:
                self._overflow_reporting = None
                more = bool(self._overflow)
                self._settled_cond.notify_all()
        if more:
            self._report_overflow()

    # ------------------------------------------------------------------ flush / shutdown

    def _settled(self, target: int) -> bool:
        """Are all events with sequence number < ``target`` resolved? (Hold the lock.)"""
        return (
            self._left >= target
            and (self._inflight is None or self._inflight_start >= target)
            and (not self._overflow or self._overflow_first >= target)
            and (self._overflow_reporting is None or self._overflow_reporting >= target)
        )

    def _unsettled(self, target: int) -> int:
        """How many events with sequence number < ``target`` are unresolved. (Hold the lock.)"""
        count = max(0, target - self._left)
        if self._inflight is not None and self._inflight_start < target:
            count += min(len(self._inflight_events), target - self._inflight_start)
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

    def _wait_settled(self, deadline: Deadline) -> FlushResult:
        before = self._snapshot()
        with self._lock:
            target = self._accepted
        if self._worker_alive():
            with self._lock:
                self._flush_requests += 1
            self._wake.set()
            try:
                with self._settled_cond:
                    while not self._settled(target):
                        left = deadline.remaining()
                        if left is not None and left <= 0:
                            break
                        self._settled_cond.wait(left)
                        if not self._worker_alive():
                            break
            finally:
                with self._lock:
                    self._flush_requests -= 1
        if not self._worker_alive():
            self._drain_inline(deadline, full=True)
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
        """Flush (if ``flush``), stop the thread, report what is left. Idempotent."""
        deadline = Deadline.after(timeout)
        with self._lock:
            if self._closed:
                return FlushResult()
            self._closed = True
            if not flush:
                leftovers = list(self._queue)
                self._queue.clear()
                self._left += len(leftovers)
            else:
                leftovers = []
        before = self._snapshot()
        self._worker_deadline.tighten(deadline.at if flush else _monotonic())
        if flush:
            self._wait_settled(deadline)
        with self._lock:
            self._stopping = True
        self._wake.set()
        thread = self._thread
        if isinstance(thread, Thread) and thread.is_alive() and thread is not threading.current_thread():
            thread.join(deadline.remaining())
        with self._lock:
            leftovers += list(self._queue)
            self._left += len(self._queue)
            self._queue.clear()
            claim, abandoned = self._inflight, self._inflight_events
        self._report_overflow()
        if claim is not None and claim.take():
            self.delivery.fail(abandoned, "shutdown deadline reached while this batch was being sent")
            with self._lock:
                if self._inflight is claim:
                    self._inflight = None
                    self._inflight_events = []
        if leftovers:
            reason = (
                "shutdown deadline reached before the event was sent"
                if flush
                else "client shut down with flush_on_shutdown=False; event not sent"
            )
            self.delivery.drop(leftovers, reason)
        after = self._snapshot()
        with self._lock:
            unsent = len(self._queue) + (len(self._inflight_events) if self._inflight else 0)
        return FlushResult(
            sent=after["sent"] - before["sent"],
            failed=after["failed"] - before["failed"],
            dropped=after["dropped"] - before["dropped"],
            unsent=unsent,
            timed_out=deadline.expired() and bool(leftovers or claim),
        )

    def counts(self) -> Dict[str, int]:
        with self._lock:
            pending = len(self._queue) + (len(self._inflight_events) if self._inflight is not None else 0)
            return {"accepted": self._accepted, "pending": pending, "dropped": self._dropped}

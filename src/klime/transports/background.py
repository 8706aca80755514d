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

import functools
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

#: How long a send on the caller's thread (no background thread here) may take.
_INLINE_TIMEOUT_S = 5.0

#: Dropped events are handed to on_error at most this many at a time.
_REPORT_SLICE = 1000


class _Claim:
    """Who settles an in-flight batch: its sender, or a shutdown that gave up waiting.

    Taken once, under the transport's lock."""

    __slots__ = ("taken",)

    def __init__(self) -> None:
        self.taken = False


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
        self._overflow_unheld = 0  # dropped with nobody to hand them to: counted, not kept
        self._dropped = 0
        self._overflow_first = 0
        self._reporting: List[int] = []  # first sequence numbers of reports in progress
        self._overflow_episode = 0
        self._reporter: Optional[Thread] = None
        self._report_wake = threading.Event()
        self._flush_pending = False
        self._closed = closed
        self._stopping = False
        self._thread: Optional[object] = None
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
        if thread is None:
            thread = self._start()
        if thread is _NO_THREAD:
            if self._inline_each or size >= self.max_batch_size or overflow:
                # bounded: an unreachable endpoint must not stall the caller for the whole
                # retry budget (what is not sent in time is reported, not kept)
                self._drain_inline(Deadline.after(_INLINE_TIMEOUT_S), full=self._inline_each)
        elif size == self.max_batch_size:
            self._wake.set()
        elif overflow:
            self._report_soon()
        return True

    def _keep_dropped(self) -> bool:
        """Keep a dropped event for ``on_error``? Not when nobody would receive it."""
        delivery = self._delivery
        return delivery is not None and delivery.has_error_callback()

    def _report_soon(self) -> None:
        """Have dropped events reported now, even while the sender thread is stuck in a
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
                    full = stopping or self._flush_pending or _monotonic() >= next_due
                    self._flush_pending = False
                if full:
                    next_due = _monotonic() + interval
                self._drain(self._worker_deadline, full=full)
                with self._lock:
                    if self._stopping and (not self._queue or self._worker_deadline.expired()):
                        return
        except BaseException:  # never expected; keep the books honest and say so
            with self._lock:
                self._thread = _NO_THREAD  # from now on, callers drain inline
                self._settled_cond.notify_all()  # a waiting flush must not wait for a dead thread
            log.exception("klime: the sender thread stopped unexpectedly")
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
                    self.delivery.send(batch, deadline, claim=functools.partial(self._settle, claim))
                finally:
                    with self._lock:
                        if self._inflight is claim:  # only if send raised before settling
                            self._inflight = None
                            self._inflight_events = []
                        self._settled_cond.notify_all()
                self._report_overflow()

    def _settle(self, claim: _Claim) -> bool:
        """Called by Delivery just before it counts a batch's outcome: the batch stops being
        in flight at that instant (so ``stats()`` never counts it twice), unless a shutdown
        already gave up on it and accounted for it."""
        with self._lock:
            if claim.taken:
                return False
            claim.taken = True
            if self._inflight is claim:
                self._inflight = None
                self._inflight_events = []
            return True

    def _drain_inline(self, deadline: Deadline, *, full: bool) -> None:
        self._report_overflow()
        self._drain(deadline, full=full)

    def _report_overflow(self) -> None:
        """Hand dropped events to ``on_error``, at most ``_REPORT_SLICE`` per call; log the
        start and end of an overflow episode once each. Thread-safe."""
        while True:
            with self._lock:
                dropped = self._overflow
                unheld, self._overflow_unheld = self._overflow_unheld, 0
                if not dropped and not unheld:
                    if self._overflow_episode and len(self._queue) < self.max_queue_size:
                        total, self._overflow_episode = self._overflow_episode, 0
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
                first_of_episode = self._overflow_episode == 0
                self._overflow_episode += len(dropped) + unheld
            try:
                if first_of_episode:
                    log.warning(
                        "klime: the queue is full (max_queue_size=%d); dropping the oldest events "
                        "and reporting them to on_error. Raise max_queue_size, or check that the "
                        "endpoint is reachable",
                        self.max_queue_size,
                    )
                reason = f"queue full (max_queue_size={self.max_queue_size}); event dropped"
                if dropped:
                    self.delivery.drop(dropped, reason, counted=True)
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
            and (self._inflight is None or self._inflight_start >= target)
            and (not self._overflow or self._overflow_first >= target)
            and all(first >= target for first in self._reporting)
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
        current = threading.current_thread()
        if current is self._thread or current is self._reporter:
            # flush() from inside a callback, on klime's own thread: it cannot wait for
            # itself. The events go out as soon as the callback returns.
            with self._lock:
                self._flush_pending = True
                unsent = self._unsettled(target)
            return FlushResult(unsent=unsent)
        if self._worker_alive():
            with self._lock:
                self._flush_pending = True
            self._wake.set()
            with self._settled_cond:
                while not self._settled(target):
                    left = deadline.remaining()
                    if left is not None and left <= 0:
                        break
                    self._settled_cond.wait(left)
                    if not self._worker_alive():
                        break
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
        self._report_wake.set()
        thread = self._thread
        if isinstance(thread, Thread) and thread.is_alive() and thread is not threading.current_thread():
            thread.join(deadline.remaining())
        with self._lock:
            leftovers += list(self._queue)
            self._left += len(self._queue)
            self._queue.clear()
            claim, abandoned = self._inflight, self._inflight_events
            taken = claim is not None and not claim.taken
            if claim is not None and taken:
                claim.taken = True  # the sender's outcome, if it ever comes, is not counted
                self._inflight = None
                self._inflight_events = []
        self._report_overflow()
        if taken:
            self.delivery.fail(abandoned, "shutdown deadline reached while this batch was being sent")
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
            timed_out=deadline.expired() and bool(leftovers or taken),
        )

    def counts(self) -> Dict[str, int]:
        with self._lock:
            pending = len(self._queue) + (len(self._inflight_events) if self._inflight is not None else 0)
            return {"accepted": self._accepted, "pending": pending, "dropped": self._dropped}

"""The invocation transport: buffer during a serverless invocation, send before it ends.

AWS Lambda freezes the process the moment a handler returns (and Cloud Functions throttles
its CPU), so a background thread cannot be trusted to send anything. This transport runs
no thread of its own: events wait in a buffer until ``flush`` sends them — called by
:func:`klime.klime_lambda` / :func:`klime.klime_cloud_function` before the handler returns —
over the sender's keep-alive connections, which are reused across warm invocations. A
flush takes the buffer as a known set of batches, a small queue (:class:`KnownBatches`),
and runs the pump's on-demand drain over it
(:func:`klime.transports.background.drain_on_demand`: the pump's one loop on the caller's
thread plus helper threads that end before it returns). When more requests in flight pay
(round trips spent on the wire, not the CPU) it sends several batches at once — as many
as the adaptive limit the background transport uses allows
(:mod:`klime.transports._flights`; learned across invocations, so a warm invocation sends
its batches in about one round trip). Events the flush's deadline kept from being
sent stay buffered, first in line for the next flush, and count as ``queued``.

Without the decorator events still go out, on the caller's thread: a full batch
(``max_batch_size``) is sent inline, and so are events left over from before the current
invocation, with one warning naming the decorator. An event counts as left over when it
was recorded under another Lambda invocation (the ``_X_AMZN_TRACE_ID`` the runtime sets
for each invocation changed) or, where there is no such marker, more than
``flush_interval`` ago. Such inline sends are bounded by ``inline_timeout``; events they
could not send stay buffered, and inline sending pauses (doubling, up to a minute) until
one succeeds, so a dead endpoint costs a handler one bounded stall, not one per event.

Under a decorator (after :meth:`InvocationTransport.begin_invocation`) nothing is sent
inline until ``max_queue_size`` events wait, since one concurrent flush at the end is
faster than many sequential sends; such a send is bounded by the invocation's deadline
(:func:`invocation_deadline`).
"""

from __future__ import annotations

import contextvars
import functools
import os
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Deque, Dict, List, Optional, Tuple

from .._config import (
    DEFAULT_FLUSH_INTERVAL_MS,
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_CONCURRENT_REQUESTS,
    DEFAULT_MAX_QUEUE_SIZE,
)
from .._deadline import Deadline
from .._delivery import KEEP_UNSENT
from .._logging import log
from .._models import FlushResult
from .._retry import backoff_delay
from ..senders.base import Pace
from ._flights import Batch, Flights
from .background import drain_on_demand
from .base import Transport

if TYPE_CHECKING:
    from .._delivery import Delivery, Outcome

__all__ = ["InvocationTransport"]

_monotonic = time.monotonic
_environ = os.environ

#: The environment variable AWS Lambda's runtime sets to a new value for each invocation.
LAMBDA_TRACE_ENV = "_X_AMZN_TRACE_ID"

#: Longest pause of inline sending after inline sends could not deliver, in seconds.
MAX_INLINE_PAUSE_S = 60.0

#: The deadline of the invocation running in this context (thread or asyncio task).
_deadline_var: contextvars.ContextVar[Optional[Deadline]] = contextvars.ContextVar(
    "klime_invocation_deadline", default=None
)


def invocation_deadline() -> Optional[Deadline]:
    """The deadline of the decorated invocation running in this context, if any."""
    return _deadline_var.get()


def enter_invocation(deadline: Optional[Deadline]) -> contextvars.Token[Optional[Deadline]]:
    """Make ``deadline`` the current invocation's deadline in this context (thread or task).

    Inline sends that happen in this context stop at it. Undo with :func:`exit_invocation`.
    """
    return _deadline_var.set(deadline)


def exit_invocation(token: contextvars.Token[Optional[Deadline]]) -> None:
    """Undo :func:`enter_invocation` (in the context that entered)."""
    try:
        _deadline_var.reset(token)
    except ValueError:  # a token from another context: forget the deadline instead
        _deadline_var.set(None)


def _marker() -> Optional[str]:
    return _environ.get(LAMBDA_TRACE_ENV)


class KnownBatches:
    """The small queue of one flush: the batches it took from the buffer, as the
    :class:`~klime.transports.background.BatchSource` the pump's on-demand drain
    (:func:`~klime.transports.background.drain_on_demand`) takes from. Deferred batches go
    first, then the waiting ones, as the limit of ``flights`` allows. What the deadline
    cut is kept, not reported (:data:`~klime._delivery.KEEP_UNSENT`), and handed back by
    :meth:`leftover_locked`. Guarded by ``flights.lock`` (the transport's lock)."""

    def __init__(self, batches: List[List[bytes]], flights: Flights, delivery: Delivery) -> None:
        self._waiting: Deque[Batch] = deque(Batch(0, events) for events in batches)
        self._flights = flights
        self._lock = flights.lock
        self._delivery = delivery

    def take_locked(self) -> Optional[Batch]:
        """A deferred batch, else a waiting one, when the limit has room; then in the air."""
        flights = self._flights
        batch = flights.take_deferred_locked()
        if batch is None and self._waiting and flights.room_locked():
            batch = flights.mark_sending_locked(self._waiting.popleft())
        return batch

    def takeable_locked(self) -> int:
        flights = self._flights
        room = flights.limit.limit - len(flights.flying)
        return max(0, min(room, len(self._waiting) + len(flights.deferred)))

    def send(self, batch: Batch, deadline: Deadline, pace: Pace) -> None:
        """Send one batch (blocks) and settle it; what comes back waits, deferred, first in
        line. Never raises: on an unexpected error the whole batch is kept."""
        try:
            self._delivery.send(
                batch.events,
                deadline,
                keep=KEEP_UNSENT,
                settle=functools.partial(self._settle, batch),
                pace=pace,
                retry=batch.retry,
            )
        except Exception:  # Delivery never raises; if it does, keep the batch
            log.exception("klime: sending a batch failed unexpectedly")
            with self._lock:
                self._flights.settle_locked(batch, batch.events, batch.retry, None)

    def _settle(self, batch: Batch, outcome: Outcome) -> bool:
        with self._lock:
            return self._flights.settle_locked(batch, outcome.unsent or [], outcome.retry, outcome.last_error)

    def pace(self, outcome: str, seconds: float, cpu: float) -> bool:
        """One attempt's outcome, for the limit (the backlog: what waits and is deferred)."""
        with self._lock:
            flights = self._flights
            backlog = len(self._waiting) + len(flights.deferred)
            return flights.pace_locked(outcome, seconds, cpu, backlog=backlog)

    def leftover_locked(self) -> List[bytes]:
        """After the drain: the events it did not deliver (deferred first, then those never
        taken), now off this queue and out of ``flights``; not counted."""
        _, parked = self._flights.abandon_locked()
        kept = [event for batch in (*parked, *self._waiting) for event in batch.events]
        self._waiting.clear()
        return kept


class InvocationTransport(Transport):
    """Buffer events; send them on ``flush`` (or inline; see the module docstring).

    The sender's stack (the HTTP library) is loaded at the first send, not when the client
    is made: on serverless, start-up time is the caller's latency.

    Args:
        flush_interval: milliseconds (Ruby SDK unit) after which, where the platform gives
            no invocation marker, a buffered event counts as left over from an earlier
            invocation.
        max_batch_size: events per request (1..100).
        max_queue_size: buffered events at most; beyond it the oldest are dropped and
            reported to ``on_error`` (reachable only while sends keep failing).
        max_concurrent_requests: batches sent at once by ``flush`` at most, reached when
            more in flight pays (the adaptive limit decides below it).
        inline_timeout: seconds an inline send outside a decorated invocation may take.

    Thread-safe. ``submit`` returns at once, except when it sends inline (see above);
    ``flush`` blocks until the buffer is sent or its timeout passes.
    """

    name = "invocation"
    prepare_sender_early = False

    def __init__(
        self,
        *,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL_MS,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE,
        max_concurrent_requests: int = DEFAULT_MAX_CONCURRENT_REQUESTS,
        inline_timeout: float = 2.0,
    ) -> None:
        self.flush_interval = float(flush_interval) / 1000.0
        self.max_batch_size = max(1, min(100, int(max_batch_size)))
        self.max_queue_size = max(1, int(max_queue_size))
        self.max_concurrent_requests = max(1, int(max_concurrent_requests))
        self.inline_timeout = max(0.0, float(inline_timeout))
        #: True once a serverless decorator has called :meth:`begin_invocation`.
        self.managed = False
        self._reset()

    def _reset(self) -> None:
        closed = getattr(self, "_closed", False)  # a transport shut down before a fork stays shut
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._buffer: List[bytes] = []
        self._oldest_at = 0.0  # when the oldest buffered event was recorded (monotonic)
        self._oldest_marker: Optional[str] = None  # and under which Lambda invocation
        self._overflow: List[bytes] = []  # dropped for room, not yet counted and reported
        self._accepted = 0
        self._inflight = 0
        self._inline_failures = 0
        self._paused_until = 0.0
        self._flights = Flights(
            self._lock, ceiling=self.max_concurrent_requests, name="klime-flush", grow_at_once=True
        )
        self._closed = closed

    def after_fork(self) -> None:
        self._reset()

    # ------------------------------------------------------------------ invocations

    def begin_invocation(self) -> None:
        """Called by the serverless decorators as an invocation starts: from now on the
        decorator flushes, so events wait for its flush instead of going inline.
        Non-blocking, thread-safe."""
        self.managed = True

    # ------------------------------------------------------------------ submit

    def submit(self, event: bytes) -> bool:
        """Buffer one event; see the class docstring for when it blocks. Thread-safe."""
        managed = self.managed
        now = _monotonic()
        marker = None if managed else _marker()
        stale = False
        report_overflow = False
        with self._lock:
            if self._closed:
                return False
            buffer = self._buffer
            if buffer:
                if not managed:
                    if marker is not None or self._oldest_marker is not None:
                        stale = marker != self._oldest_marker
                    else:
                        stale = now - self._oldest_at > self.flush_interval
            else:
                self._oldest_at = now
                self._oldest_marker = marker
            if len(buffer) >= self.max_queue_size:
                self._overflow.append(buffer.pop(0))
                report_overflow = len(self._overflow) >= self.max_batch_size
            buffer.append(event)
            self._accepted += 1
            waiting = len(buffer)
        if report_overflow:
            self._report_overflow()
        if managed:
            if waiting >= self.max_queue_size:
                self._send_inline(now, full_only=False)
            return True
        if stale:
            log.warning_once(
                "invocation-leftovers",
                "klime: events recorded before this invocation were still waiting to be "
                "sent; sending them now. Decorate the handler with @klime_lambda (or "
                "@klime_cloud_function) so that each invocation's events are sent before "
                "it returns",
            )
            self._send_inline(now, full_only=False)
        elif waiting >= self.max_batch_size:
            self._send_inline(now, full_only=True)
        return True

    def _send_inline(self, now: float, *, full_only: bool) -> None:
        if now < self._paused_until:
            return
        deadline = _deadline_var.get()
        if deadline is None:
            deadline = Deadline.after(self.inline_timeout)
        if self._send(deadline, full_only=full_only):
            self._inline_failures = 0
            self._paused_until = 0.0
            return
        self._inline_failures += 1
        pause = backoff_delay(self._inline_failures, max(self.flush_interval, 0.5), MAX_INLINE_PAUSE_S)
        self._paused_until = _monotonic() + pause
        log.warning(
            "klime: %d events could not be sent in time; they stay buffered and inline "
            "sending pauses for %.1fs (flush() sends them)",
            self.pending(),
            pause,
        )

    # ------------------------------------------------------------------ sending

    def _take(self, full_only: bool) -> Tuple[List[List[bytes]], float, Optional[str]]:
        size = self.max_batch_size
        with self._lock:
            buffer = self._buffer
            n = len(buffer) - (len(buffer) % size if full_only else 0)
            oldest_at, oldest_marker = self._oldest_at, self._oldest_marker
            if n <= 0:
                return [], oldest_at, oldest_marker
            taken, self._buffer = buffer[:n], buffer[n:]
            # What stays is younger than what left; keeping the older stamp errs toward
            # sending it sooner.
            self._inflight += n
        return [taken[i : i + size] for i in range(0, n, size)], oldest_at, oldest_marker

    def _send(self, deadline: Deadline, *, full_only: bool = False) -> bool:
        """Send the buffer (or its full batches). Returns False when the deadline left
        events unsent; they are back at the head of the buffer."""
        with self._send_lock:
            batches, oldest_at, oldest_marker = self._take(full_only)
            if not batches:
                return True
            kept = [event for batch in batches for event in batch]  # if all else fails
            try:
                kept = self._fly(batches, deadline)
            finally:
                with self._lock:
                    self._inflight -= sum(map(len, batches))
                    if kept:  # first in line for the next flush, with their original age
                        if not self._buffer:
                            self._oldest_at, self._oldest_marker = oldest_at, oldest_marker
                        else:
                            self._oldest_at = min(self._oldest_at, oldest_at)
                        self._buffer[0:0] = kept
            return not kept

    def _fly(self, batches: List[List[bytes]], deadline: Deadline) -> List[bytes]:
        """Send ``batches`` with the pump's on-demand drain over a :class:`KnownBatches`:
        several at once as the limit allows, on this thread and helpers that end before
        this returns. Returns the events not delivered by the deadline (not counted: the
        caller keeps them). Blocks; under ``_send_lock``."""
        flights = self._flights
        known = KnownBatches(batches, flights, self.delivery)
        with self._lock:
            flights.limit.allow_all_at_once(len(batches))
        try:
            drain_on_demand(known, flights, deadline, known.pace)
        finally:
            with self._lock:
                kept = known.leftover_locked()
        return kept

    def _report_overflow(self) -> None:
        with self._lock:
            dropped, self._overflow = self._overflow, []
        if dropped:
            log.warning_once(
                "invocation-overflow",
                "klime: more than max_queue_size=%d events waiting; dropping the oldest",
                self.max_queue_size,
            )
            self.delivery.drop(dropped, f"buffer full (max_queue_size={self.max_queue_size}); event dropped")

    # ------------------------------------------------------------------ flush / shutdown

    def flush(self, timeout: Optional[float] = None) -> FlushResult:
        """Send everything buffered, several batches at once, within ``timeout`` seconds.

        Blocks; thread-safe. Events that could not be sent in time (their batch had not
        started, or was still retrying a transient failure, at the deadline) stay buffered
        for the next flush and are reported as ``unsent``.
        """
        deadline = Deadline.after(timeout)
        ledger = self.delivery.ledger
        before = ledger.tally()
        self._report_overflow()
        self._send(deadline)
        return ledger.result_since(before, unsent=self.pending(), expired=deadline.expired())

    def shutdown(self, timeout: Optional[float] = None, *, flush: bool = True) -> FlushResult:
        """Flush (when ``flush``) within ``timeout`` seconds, then refuse new events;
        what is still buffered is dropped and reported. Idempotent; blocks; thread-safe."""
        with self._lock:
            if self._closed:
                return FlushResult()
            self._closed = True
        ledger = self.delivery.ledger
        before = ledger.tally()
        if flush:
            self.flush(timeout)
        self._report_overflow()
        with self._send_lock, self._lock:
            leftovers, self._buffer = self._buffer, []
        if leftovers:
            self.delivery.drop(
                leftovers,
                "shutdown deadline reached before the event was sent"
                if flush
                else "client shut down with flush_on_shutdown=False; event not sent",
            )
        return ledger.result_since(before, timed_out=False)

    def pending(self) -> int:
        """Events accepted and not yet resolved (buffered or being sent). Thread-safe."""
        with self._lock:
            return len(self._buffer) + self._inflight + len(self._overflow)

    def counts(self) -> Dict[str, int]:
        with self._lock:
            return {
                "accepted": self._accepted,
                "pending": len(self._buffer) + self._inflight + len(self._overflow),
            }

"""The pump, its queue interface and the memory queue; the background transport.

The background transport is the default outside serverless: a :class:`Pump` over a
:class:`MemoryQueue`. ``submit`` appends to a deque under a lock held for microseconds and
returns. A named daemon thread (``klime-sender``), started on the first event of each
process, sends a batch every ``flush_interval`` ms or as soon as ``max_batch_size`` events
wait, back to back while a backlog remains. When a backlog waits and round trips are slow,
more requests fly at once, on more threads of a bounded pool (``klime-sender-2``, ...; at
most ``max_concurrent_requests``), started only then and retired after
:data:`IDLE_RETIRE_S` without work; how many is decided by the server's answers
(:mod:`klime.transports._flights`). With less than a batch waiting, one request at a time.

Where no thread can run (uWSGI without threads, a uWSGI master, interpreter shutdown) the
same queue is drained on the caller's thread instead: at ``max_batch_size`` events, and by
``flush``. At exit the flushing thread sends batches too, beside the pool (on Python 3.12+
no new thread may start then).

**The pump** (:class:`Pump`) is what every queued transport is: the sender threads, the
batches in the air and deferred with their limit (a :class:`~._flights.Flights`), draining
on the caller's thread where no thread may run, and the wait for a flush to settle. It
takes batches from a :class:`BatchQueue` — where batches come from and go back to — and
never knows which one: :class:`MemoryQueue` here (the background transport), the spool
queue of :mod:`klime.transports.spooled` (the spool transport). Both transports are
configurations of it (they only build their queue); neither overrides its methods.
``submit`` always appends to the pump's memory queue (the spool queue's writer moves that
deque to disk); it is written out in :meth:`Pump.submit` itself, the caller's path, with
no call into the queue but the rare "a full batch waits".

Book-keeping of the memory queue: every event gets a sequence number when queued. Events
leave the queue in that order, either taken into a batch or dropped as the oldest on
overflow, so "everything queued before this call is resolved" is a comparison of sequence
numbers (:meth:`MemoryQueue.settled_locked`); a batch remembers the number of its first
event while it is in the air or deferred.

The pump's one loop, :func:`fly_batches`: take a batch from the queue (deferred ones first;
a full one while the limit allows; a partial one only when released by the interval, a
flush or the shutdown, and only when nothing else is in the air), have the queue send it
through the delivery (whose retry loop tells the pace hook, :meth:`Pump._pace`, each
attempt's outcome, which feeds the concurrency limit), and the queue settles it. It runs in
three ways: on the sender threads (the first, ``klime-sender``, keeps the flush interval
and never retires; helpers end after :data:`IDLE_RETIRE_S` idle or when more are running
than the limit needs); where no thread may run, on the calling thread, one batch at a time
(:meth:`Pump._drain_here`); and on demand (:func:`drain_on_demand`): the caller's thread
plus helpers that end before it returns, over any :class:`BatchSource` — the invocation
transport's flush runs it over the small queue of its known batches.
May import: the model, the delivery and its ledger, the senders' interface (``Pace``), the
in-flight machinery.
"""

from __future__ import annotations

import functools
import sys
import threading
import time
from collections import deque
from typing import Callable, Deque, Dict, List, Optional, Protocol, Tuple

from .._config import (
    DEFAULT_FLUSH_INTERVAL_MS,
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_CONCURRENT_REQUESTS,
    DEFAULT_MAX_QUEUE_SIZE,
)
from .._deadline import Deadline
from .._delivery import Delivery, Outcome
from .._ledger import Tally
from .._logging import log
from .._models import FlushResult
from ..senders.base import Pace
from ._dropped import DroppedEvents
from ._flights import Batch, Flights
from .base import Transport

__all__ = ["BackgroundTransport"]

_monotonic = time.monotonic

#: How long a send on the caller's thread (no background thread here) may take.
INLINE_TIMEOUT_S = 5.0

#: A helper thread of the pool with nothing to send for this long (seconds) ends.
IDLE_RETIRE_S = 10.0

#: What a flush waits for: a queue's own marks, taken when the flush began (see
#: :meth:`BatchQueue.begin_flush`).
Goal = Tuple[int, int]


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


class BatchSource(Protocol):
    """What the pump's loop (:func:`fly_batches`) takes batches from: the part of a
    :class:`BatchQueue` that gives batches out and sends them. A known set of batches (an
    invocation's flush, :class:`klime.transports.invocation.KnownBatches`) is one too.

    Methods named ``*_locked`` are called with the owner's lock held (the lock of the
    :class:`~._flights.Flights` the batches fly in) and must not block; ``send`` is called
    without it and blocks.
    """

    def take_locked(self) -> Optional[Batch]:
        """The next batch that may take off now (deferred ones first; a full one while the
        limit allows; a partial one when released), already counted as in the air."""
        ...

    def takeable_locked(self) -> int:
        """How many more batches could take off now, within the limit."""
        ...

    def send(self, batch: Batch, deadline: Deadline, pace: Pace) -> None:
        """Send ``batch`` (one this source gave out) through the delivery and settle it:
        delivered or refused events leave, the others come back. Blocks; never raises."""
        ...


class BatchQueue(BatchSource, Protocol):
    """Where a :class:`Pump`'s batches come from and go back to: a :class:`BatchSource`
    that also fills, flushes and closes.

    A queue holds the pump's lock (given in :meth:`reset`); every method named
    ``*_locked`` is called with it held and must not block. The others are called without
    it, on a sender thread or a flushing caller, and may block (the spool's SQLite).

    Two queues implement it: :class:`MemoryQueue` (the deque ``submit`` appends to) and
    :class:`klime.transports.spooled.SpoolQueue` (the spool on disk, which falls back to
    the memory queue it holds when the spool becomes unusable).
    """

    def reset(self, pump: Pump) -> None:
        """Start empty, bound to ``pump`` (its lock, flights, conditions): at creation and
        in a forked child."""
        ...

    def start(self) -> None:
        """The pump's first sender thread started: start the queue's own threads, if any."""
        ...

    def full_batch_locked(self, size: int) -> None:
        """``submit`` just brought the memory queue to ``size`` events, a multiple of
        ``max_batch_size``. The caller's thread: microseconds."""
        ...

    def release_locked(self) -> None:
        """The flush interval came, or a flush: partial batches may go."""
        ...

    def wake_in_locked(self) -> float:
        """Seconds until something becomes due that no event will announce."""
        ...

    def before_drain(self) -> None:
        """A caller's thread is about to send batches itself (no thread, or a shutdown)."""
        ...

    def begin_flush(self, *, blocking: bool = True) -> Goal:
        """A flush begins: release what is queued now and return what it waits for.
        ``blocking`` False: on klime's own thread (a callback), do no I/O."""
        ...

    def settled_locked(self, goal: Goal) -> bool:
        """Is everything a flush begun with ``goal`` waits for resolved?"""
        ...

    def recheck_in_locked(self) -> Optional[float]:
        """How often a waiting flush must look again without being woken (None: never)."""
        ...

    def unsent_locked(self, goal: Goal) -> int:
        """Events a flush begun with ``goal`` leaves unresolved."""
        ...

    def discard_locked(self, flush: bool) -> Tuple[List[bytes], List[Batch]]:
        """A shutdown begins: the events (queued, and deferred batches) it must report
        without trying them (with ``flush`` False), now off the queue."""
        ...

    def close(self, deadline: Deadline) -> bool:
        """The threads have stopped: keep what is left (True: kept durably, nothing to
        report) or not (False: the pump reports what is left as lost)."""
        ...

    def counts_locked(self) -> Dict[str, int]:
        """``accepted``, ``pending`` and the queue's own counts (see Transport.counts)."""
        ...


# ---------------------------------------------------------------------- the one loop

#: What :func:`fly_batches` asks before each flight: the next batch and how many helper
#: threads to start for others that may go now, or ``(None, 0)``: stop.
NextBatch = Callable[[], Tuple[Optional[Batch], int]]


def fly_batches(
    next_batch: NextBatch,
    fly: Callable[[Batch], None],
    start_helpers: Optional[Callable[[int], None]] = None,
) -> None:
    """The pump's loop, the only one that takes batches and flies them: take a batch
    (``next_batch``), start the helper threads it asks for (``start_helpers``), fly it
    (``fly``: the source's ``send``, which blocks and settles it); until ``next_batch``
    says stop. Run in three ways, which differ only in ``next_batch``:

    - on a sender thread (:meth:`Pump._work`): it waits for work (:meth:`Pump._next`: the
      flush interval, the helpers' retirement, the shutdown);
    - on the caller's thread where no thread may run (:meth:`Pump._drain_here`), and on an
      on-demand drain's helpers: what may go now, no waiting, no helpers (:func:`take_now`);
    - on demand (:func:`drain_on_demand`, an invocation's flush): the caller's thread also
      waits for the batches in the air (they may come back deferred) and starts helpers
      that end before it returns.

    Blocks until then; call it without the lock. Not thread-safe by itself: each thread
    runs its own."""
    while True:
        batch, more = next_batch()
        if batch is None:
            return
        if more and start_helpers is not None:
            start_helpers(more)
        fly(batch)


def take_now(source: BatchSource, lock: threading.Lock, deadline: Deadline) -> Tuple[Optional[Batch], int]:
    """A :data:`NextBatch` that never waits: the batch ``source`` lets go now (None when
    none may, or ``deadline`` passed), and no helper. Takes ``lock`` (the source's)."""
    with lock:
        return (None if deadline.expired() else source.take_locked()), 0


def drain_on_demand(source: BatchSource, flights: Flights, deadline: Deadline, pace: Pace) -> None:
    """The pump's on-demand drain: fly every batch ``source`` gives out (its batches fly in
    ``flights``, under ``flights.lock``), as many at once as the limit allows, on the
    calling thread and on helper threads (``<flights.name>-<n>``) that end before this
    returns, until nothing is left to take and nothing is in the air, or ``deadline``.
    What is left then stays in ``source`` and ``flights.deferred`` for the caller. The
    limit is not lowered as the threads end: a source's next drain starts from it. ``pace``
    hears each attempt's outcome.

    The invocation transport's flush runs it over the small queue of its known batches.
    Blocks; call it without the lock, from one thread at a time per ``flights``."""
    lock = flights.lock
    helpers: List[threading.Thread] = []

    def fly(batch: Batch) -> None:
        try:
            source.send(batch, deadline, pace)
        finally:
            with lock:
                flights.work.notify_all()  # the caller may be waiting for it (see next_here)

    def next_here() -> Tuple[Optional[Batch], int]:
        # the caller's thread: a batch, and helpers for the others that may go now; while
        # none may go, wait for the batches in the air: they may come back deferred
        with lock:
            while True:
                batch = None if deadline.expired() else source.take_locked()
                if batch is not None:
                    return batch, flights.threads_wanted_locked(source.takeable_locked())
                if not flights.flying:
                    return None, 0
                left = deadline.remaining()  # flights in the air stop at it themselves
                flights.idle += 1
                try:
                    flights.work.wait(1.0 if left is None else max(0.01, min(1.0, left)))
                finally:
                    flights.idle -= 1

    def helper() -> None:
        try:
            fly_batches(functools.partial(take_now, source, lock, deadline), fly)
        finally:
            with lock:
                flights.retire_locked(threading.current_thread(), lower_limit=False)

    def start_helpers(n: int) -> None:
        helpers.extend(flights.spawn_helpers(helper, n))

    me = threading.current_thread()
    with lock:
        flights.threads.append(me)  # the caller's thread is one of the senders
    try:
        fly_batches(next_here, fly, start_helpers)
    finally:
        for thread in helpers:
            thread.join()
        with lock:
            flights.retire_locked(me, lower_limit=False)


class MemoryQueue:
    """The memory queue: encoded events in a bounded deque, numbered in order (see the
    module docstring). ``submit`` appends to :attr:`events` directly (:meth:`Pump.submit`);
    on overflow the oldest event is dropped (:meth:`drop_oldest_locked`), counted, and kept
    for ``on_error`` (:attr:`drops`). Guarded by the pump's lock."""

    def __init__(self, *, max_batch_size: int, max_queue_size: int) -> None:
        self.max_batch_size = max(1, min(100, int(max_batch_size)))
        self.max_queue_size = max(1, int(max_queue_size))
        # the rest is set by reset(), which the pump calls at once

    def reset(self, pump: Pump) -> None:
        self._pump = pump
        self._lock = pump.lock
        self._flights = pump.flights
        self.events: Deque[bytes] = deque()
        self.accepted = 0
        self.left = 0
        self.release_to = 0
        self.drops = DroppedEvents(
            pump.lock,
            pump.settled,
            max_queue_size=self.max_queue_size,
            delivery=self._delivery,
            queue_has_room=self._has_room_locked,
            stopping=self._stopping,
        )

    def _delivery(self) -> Delivery:
        return self._pump.delivery

    def _stopping(self) -> bool:
        return self._pump.stopping

    def _has_room_locked(self) -> bool:
        return len(self.events) < self.max_queue_size

    def start(self) -> None:
        pass

    # ------------------------------------------------------------------ the caller's side

    def drop_oldest_locked(self) -> None:
        """The queue is full: drop its oldest event, count it in the ledger, and keep it
        for ``on_error`` unless nobody would receive it. Microseconds; the caller's thread."""
        delivery = self._pump._delivery
        keep = delivery is not None and delivery.has_error_callback()
        self.drops.add_locked(self.events.popleft(), self.left, keep=keep)
        self.left += 1
        if delivery is not None:
            delivery.ledger.dropped_for_room_locked()

    def full_batch_locked(self, size: int) -> None:
        flights = self._flights
        if flights.idle and not flights.flying:
            # nobody in the air who would come back for it (while requests are in the air,
            # the sender threads wake each other)
            flights.work.notify()

    # ------------------------------------------------------------------ taking and settling

    def take_locked(self) -> Optional[Batch]:
        flights = self._flights
        if flights.deferred:
            return flights.take_deferred_locked()
        events = self.events
        waiting = len(events)
        if not waiting:
            return None
        size = self.max_batch_size
        if waiting >= size:
            if not flights.room_locked():
                return None
            n = size
        else:
            if flights.flying or not (self._stopping() or self.left < self.release_to):
                return None
            n = waiting
        popleft = events.popleft
        batch = Batch(self.left, [popleft() for _ in range(n)])
        self.left += n
        return flights.mark_sending_locked(batch)

    def takeable_locked(self) -> int:
        flights = self._flights
        room = flights.limit.limit - len(flights.flying)
        waiting = len(flights.deferred) + len(self.events) // self.max_batch_size
        return max(0, min(room, waiting))

    def send(self, batch: Batch, deadline: Deadline, pace: Pace) -> None:
        """Send one batch (blocks); settle it; deferred events wait, first in line."""
        delivery = self._delivery()
        try:
            delivery.send(
                batch.events,
                deadline,
                settle=functools.partial(self._settle, batch),
                pace=pace,
                retry=batch.retry,
            )
        except Exception:  # Delivery never raises; if it does, the batch is not lost silently
            log.exception("klime: sending a batch failed unexpectedly")
            with self._lock:
                orphan = self._flights.settle_locked(batch, [], batch.retry, None)
            if orphan:
                delivery.fail(batch.events, "an unexpected error happened while sending")

    def _settle(self, batch: Batch, outcome: Outcome) -> bool:
        """Called by Delivery just before it counts a batch's outcome: the batch leaves the
        air at that instant (so ``stats()`` never counts it twice), unless a shutdown
        already gave up on it and accounted for it."""
        with self._lock:
            return self._flights.settle_locked(
                batch, outcome.unsent or [], outcome.retry, outcome.last_error
            )

    def release_locked(self) -> None:
        self.release_to = max(self.release_to, self.accepted)

    def wake_in_locked(self) -> float:
        return 3600.0  # nothing becomes due here that no event announces

    def before_drain(self) -> None:
        pass

    # ------------------------------------------------------------------ flush / shutdown

    def begin_flush(self, *, blocking: bool = True) -> Goal:
        with self._lock:
            target = self.accepted
            self.release_to = max(self.release_to, target)
        return (target, 0)

    def settled_locked(self, goal: Goal) -> bool:
        """Are all events with sequence number < ``goal[0]`` resolved?"""
        target = goal[0]
        return (
            self.left >= target
            and self._flights.settled_locked(target)
            and self.drops.settled_locked(target)
        )

    def recheck_in_locked(self) -> Optional[float]:
        return None  # every change a flush waits for notifies it

    def unsent_locked(self, goal: Goal) -> int:
        """How many events with sequence number < ``goal[0]`` are unresolved."""
        target = goal[0]
        return (
            max(0, target - self.left)
            + self._flights.unsettled_locked(target)
            + self.drops.unsettled_locked(target)
        )

    def discard_locked(self, flush: bool) -> Tuple[List[bytes], List[Batch]]:
        if flush:
            return [], []
        leftovers = list(self.events)
        self.events.clear()
        self.left += len(leftovers)
        parked = list(self._flights.deferred)
        self._flights.deferred.clear()
        return leftovers, parked

    def close(self, deadline: Deadline) -> bool:
        return False

    def counts_locked(self) -> Dict[str, int]:
        return {"accepted": self.accepted, "pending": len(self.events) + self._flights.held_locked()}


class Pump(Transport):
    """Queue in the caller's thread, send from klime's sender threads (or, where none may
    run, from the caller's): the transport every queued transport is, over a
    :class:`BatchQueue` (see the module docstring). Made by :class:`BackgroundTransport`
    and :class:`~klime.transports.spooled.SpoolTransport`.

    ``queue`` builds the queue batches come from, given the memory queue ``submit`` fills
    (None: that memory queue itself); the other options are the background transport's.

    ``submit`` is thread-safe and never blocks on I/O (unless no thread may run: then a
    full batch is sent on the caller's thread, bounded by :data:`INLINE_TIMEOUT_S`).
    ``flush``/``shutdown`` are thread-safe and honour one deadline across HTTP timeouts,
    retries and backoff sleeps.
    """

    def __init__(
        self,
        queue: Optional[Callable[[MemoryQueue], BatchQueue]] = None,
        *,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL_MS,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE,
        max_concurrent_requests: int = DEFAULT_MAX_CONCURRENT_REQUESTS,
        threads: Optional[bool] = None,
    ) -> None:
        memory = MemoryQueue(max_batch_size=max_batch_size, max_queue_size=max_queue_size)
        self.flush_interval = float(flush_interval) / 1000.0
        self.max_batch_size = memory.max_batch_size
        self.max_queue_size = memory.max_queue_size
        self.max_concurrent_requests = max(1, int(max_concurrent_requests))
        self._threads_option = threads
        self._memory = memory
        self._queue: BatchQueue = memory if queue is None else queue(memory)
        self._closed = False
        self._reset()

    def _reset(self) -> None:
        #: the pump's lock: guards its state and its queue's
        self.lock = threading.Lock()
        #: notified when a batch settles, for flushes waiting (see _waiting)
        self.settled = threading.Condition(self.lock)
        #: the batches in the air and deferred, their threads and the limit
        self.flights = Flights(self.lock, ceiling=self.max_concurrent_requests, name="klime-sender")
        #: set once shutdown stops the threads
        self.stopping = False
        self._waiting = 0  # flushes waiting on `settled` (senders skip the notify without)
        self._drain_lock = threading.RLock()  # re-entered by a flush() inside a callback
        self._next_due = 0.0  # when the next interval flush is due (monotonic)
        self._thread: Optional[object] = None  # the first sender thread, or NO_THREAD
        self._inline_each = False  # no thread, and no later moment to send: send every event
        self._worker_deadline = Deadline()
        self._queue.reset(self)  # (a spool queue resets its memory queue too)

    def after_fork(self) -> None:
        self._reset()  # a client shut down before a fork stays shut (_closed is kept)

    # ------------------------------------------------------------------ hot path

    def submit(self, event: bytes) -> bool:
        """Queue one event. Thread-safe; returns in microseconds (no I/O)."""
        memory = self._memory
        with self.lock:
            if self._closed:
                return False
            events = memory.events
            overflow = len(events) >= memory.max_queue_size
            if overflow:
                memory.drop_oldest_locked()
            events.append(event)
            memory.accepted += 1
            size = len(events)
            thread = self._thread
            if size % memory.max_batch_size == 0:
                self._queue.full_batch_locked(size)
        if thread is None:
            thread = self._start()
        if thread is NO_THREAD:
            if self._inline_each or size >= memory.max_batch_size or overflow:
                # bounded: an unreachable endpoint must not stall the caller for the whole
                # retry budget (what is not sent in time is reported, not kept)
                self._drain_here(Deadline.after(INLINE_TIMEOUT_S), release=self._inline_each)
        elif overflow:
            memory.drops.report_soon()
        return True

    def _report_overflow(self) -> None:
        """Hand events dropped for room to ``on_error`` (see :mod:`._dropped`). Thread-safe."""
        self._memory.drops.report()

    # ------------------------------------------------------------------ flush / shutdown

    def _snapshot(self) -> Tally:
        return self.delivery.ledger.tally()

    def _worker_alive(self) -> bool:
        thread = self._thread
        return thread is not None and thread is not NO_THREAD and thread.is_alive()  # type: ignore[attr-defined]

    def _own_thread(self) -> bool:
        current = threading.current_thread()
        return current is self._memory.drops.reporter or current in self.flights.alive()

    def _wait_settled(self, deadline: Deadline, *, help: bool = False) -> FlushResult:
        """Wait until everything queued so far is resolved (or the deadline). ``help``:
        send batches from this thread too (at shutdown, where the deadline is final)."""
        queue = self._queue
        if self._own_thread():
            # flush() from inside a callback, on klime's own thread: it cannot wait for
            # itself. The events go out as soon as the callback returns.
            goal = queue.begin_flush(blocking=False)
            with self.lock:
                return FlushResult(unsent=queue.unsent_locked(goal))
        before = self._snapshot()
        goal = queue.begin_flush()
        if self._worker_alive():
            with self.lock:
                self.flights.work.notify_all()
            while True:
                if help:
                    self._drain_here(deadline, release=False)
                with self.settled:
                    if queue.settled_locked(goal):
                        break
                    left = deadline.remaining()
                    if left is not None and left <= 0:
                        break
                    recheck = queue.recheck_in_locked()
                    if recheck is not None:
                        left = recheck if left is None else min(left, recheck)
                    self._wait_settled_locked(left)
                if not self._worker_alive():
                    break
        if not self._worker_alive():
            self._drain_here(deadline, release=True)
        with self.lock:
            unsent = queue.unsent_locked(goal)
        return self.delivery.ledger.result_since(before, unsent=unsent, expired=deadline.expired())

    def flush(self, timeout: Optional[float] = None) -> FlushResult:
        """Block until every event queued before the call is sent or reported (the spool:
        on disk, and what was due there sent or released for a later retry), or until
        ``timeout`` seconds. Thread-safe. Returns what happened meanwhile."""
        return self._wait_settled(Deadline.after(timeout))

    def shutdown(self, timeout: Optional[float] = None, *, flush: bool = True) -> FlushResult:
        """Flush (if ``flush``), stop the threads, report what is left (the spool: keep it
        on disk). Idempotent; blocks; thread-safe.

        Everything is counted when this returns; a batch whose retry the deadline cut short
        is handed to ``on_error`` by its own sender thread, which may do so just after."""
        deadline = Deadline.after(timeout)
        with self.lock:
            if self._closed:
                return FlushResult()
            self._closed = True
            leftovers, parked = self._queue.discard_locked(flush)
        before = self._snapshot()
        self._worker_deadline.tighten(deadline.at if flush else _monotonic())
        if flush:
            self._wait_settled(deadline, help=True)
        self._stop_threads(deadline)
        if self._queue.close(deadline):
            with self.lock:
                unsent = self._queue.counts_locked()["pending"]
            return self.delivery.ledger.result_since(before, unsent=unsent, expired=deadline.expired())
        return self._finish_shutdown(deadline, before, flush, leftovers, parked)

    def _stop_threads(self, deadline: Deadline) -> None:
        """Tell every thread of ours to stop; wait for them until the deadline."""
        with self.lock:
            self.stopping = True
            self._memory.release_to = sys.maxsize  # everything, even what comes later
            self.flights.work.notify_all()
        self._memory.drops.wake.set()
        current = threading.current_thread()
        for thread in self.flights.alive():
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
        with self.lock:
            rest, deferred = self._memory.discard_locked(False)
            leftovers += rest
            parked += deferred
            abandoned, _ = self.flights.abandon_locked()
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
        with self.lock:
            unsent = self._memory.counts_locked()["pending"]
        lost = after.failed + after.dropped > before.failed + before.dropped
        timed_out = deadline.expired() and bool(leftovers or abandoned or parked or lost)
        return self.delivery.ledger.result_since(before, unsent=unsent, timed_out=timed_out)

    def counts(self) -> Dict[str, int]:
        with self.lock:
            return self._queue.counts_locked()

    def in_flight(self) -> Dict[str, int]:
        """What is being sent now: requests in the air, deferred batches, sender threads and
        the adaptive limit. For tests and debugging; thread-safe, non-blocking."""
        with self.lock:
            flights = self.flights
            return {
                "requests": len(flights.flying),
                "deferred": len(flights.deferred),
                "threads": len(flights.threads),
                "limit": flights.limit.limit,
            }

    def _start(self) -> object:
        with self.lock:
            if self._thread is not None:
                return self._thread
            allowed = self._threads_option if self._threads_option is not None else _threads_allowed()
            if not allowed:
                self._thread = NO_THREAD
                # e.g. a uWSGI master before it forks: nothing of ours runs there later
                self._inline_each = self._threads_option is None and _send_at_once()
                return NO_THREAD
            self._next_due = _monotonic() + self.flush_interval
            thread = self.flights.prepare_locked(functools.partial(self._work, True), name="klime-sender")
            self._thread = thread
        if self.flights.launch(thread):
            self._queue.start()
            return thread
        with self.lock:  # "can't create new thread at interpreter shutdown"
            self._thread = NO_THREAD
        return NO_THREAD

    # ------------------------------------------------------------------ the sender threads

    def _work(self, primary: bool) -> None:
        """The loop of every sender thread. The primary one (``klime-sender``) also keeps
        the flush interval and never retires; helpers end after IDLE_RETIRE_S idle."""
        me = threading.current_thread()
        try:
            fly_batches(
                functools.partial(self._next, primary),
                functools.partial(self._fly, deadline=self._worker_deadline),
                self._start_helpers,
            )
        except BaseException:  # never expected; keep the books honest and say so
            with self.lock:
                if primary:
                    self._thread = NO_THREAD  # from now on, callers drain inline
                self.settled.notify_all()  # a waiting flush must not wait for a dead thread
            log.exception("klime: a sender thread stopped unexpectedly")
            raise
        finally:
            with self.lock:
                self.flights.retire_locked(me)

    def _next(self, primary: bool) -> tuple[Optional[Batch], int]:
        """Wait for a batch this thread may send: (batch, how many more threads to start),
        or (None, 0) when this thread should end."""
        self._report_overflow()
        flights = self.flights
        queue = self._queue
        memory = self._memory
        idle_since: Optional[float] = None
        with self.lock:
            while True:
                now = _monotonic()
                if now >= self._next_due:
                    queue.release_locked()  # the flush interval came: partial batches may go
                    self._next_due = now + self.flush_interval
                if self.stopping and (
                    self._worker_deadline.expired() or not (memory.events or flights.deferred)
                ):
                    return None, 0
                batch = queue.take_locked()
                if batch is not None:
                    more = queue.takeable_locked()
                    if more and flights.idle:
                        flights.work.notify()  # another batch may go: an idle thread takes it
                    return batch, flights.threads_wanted_locked(more)
                if primary:
                    timeout = self._next_due - now
                    if self.stopping:
                        timeout = min(timeout, 0.05)
                else:
                    if self.stopping or len(flights.threads) > flights.ceiling_locked():
                        return None, 0  # stopping (or, never expected, above the ceiling)
                    if idle_since is None:
                        idle_since = now
                    timeout = idle_since + IDLE_RETIRE_S - now
                    if timeout <= 0:
                        return None, 0
                    timeout = min(timeout, self._next_due - now)
                flights.idle += 1
                try:
                    flights.work.wait(max(0.0, min(timeout, queue.wake_in_locked())))
                finally:
                    flights.idle -= 1

    def _start_helpers(self, n: int) -> None:
        """Start ``n`` more sender threads (fewer when threads cannot start)."""
        self.flights.spawn_helpers(functools.partial(self._work, False), n)

    def _fly(self, batch: Batch, deadline: Deadline) -> None:
        """Have the queue send one batch (blocks) and settle it; wake a waiting flush."""
        try:
            self._queue.send(batch, deadline, functools.partial(self._pace, batch))
        finally:
            if self._waiting:  # a flush waits: let it look (without one, no lock to take)
                with self.lock:
                    self.settled.notify_all()
        self._report_overflow()

    def _wait_settled_locked(self, timeout: Optional[float]) -> None:
        """Wait on ``settled`` (held by the caller) until a batch settles or ``timeout``,
        counted as a waiter: without one, the senders skip the notify."""
        self._waiting += 1
        try:
            self.settled.wait(timeout)
        finally:
            self._waiting -= 1

    def _pace(self, batch: Batch, outcome: str, seconds: float, cpu: float) -> bool:
        """One attempt's outcome, told by the retry loop: feeds the concurrency limit.
        After a transient failure, False defers the batch (more in flight than allowed)."""
        if self.flights.limit.note_fast_success(outcome, seconds, cpu):  # nothing to decide: no lock
            return True
        with self.lock:
            flights, memory = self.flights, self._memory
            backlog = len(flights.deferred) + len(memory.events) // memory.max_batch_size
            return flights.pace_locked(outcome, seconds, cpu, backlog=backlog)

    def _drain_here(self, deadline: Deadline, *, release: bool) -> None:
        """Send from the calling thread, one batch at a time, until nothing may go (or the
        deadline). ``release``: partial batches too, up to everything queued now."""
        self._report_overflow()
        queue = self._queue
        queue.before_drain()
        with self._drain_lock:
            if release:
                with self.lock:
                    queue.release_locked()
            fly_batches(
                functools.partial(take_now, queue, self.lock, deadline),
                functools.partial(self._fly, deadline=deadline),
            )


class BackgroundTransport(Pump):
    """Queue in the caller's thread, send from klime's background threads: a
    :class:`Pump` over a :class:`MemoryQueue`.

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
        super().__init__(
            flush_interval=flush_interval,
            max_batch_size=max_batch_size,
            max_queue_size=max_queue_size,
            max_concurrent_requests=max_concurrent_requests,
            threads=threads,
        )

"""The spool transport: the pump over a durable queue on disk (opt-in).

``Client(spool="/var/lib/myapp/klime")`` selects it. ``track`` is exactly the background
transport's (an append to an in-memory deque, microseconds, no I/O). A thread of klime's,
``klime-spooler``, writes what the deque holds to the spool (:mod:`klime.spool`, SQLite in
WAL mode, shared by every process of the app) at most :data:`SPOOL_WRITE_S` after it was
tracked, and at once when a quarter of ``max_queue_size`` waits; it also adopts the rows of processes that are
gone (every :data:`ADOPT_S`) and gives freed pages back to the file system. The sender
threads (the background transport's pool, with its adaptive in-flight limit) claim batches
from the spool, send them, and settle them there:

- accepted: deleted (``ack``); permanently refused (400, 401, ...): deleted and reported to
  ``on_error`` as always;
- retries ran out, or the server could not take them (an outage): *released*, due again
  after a capped backoff (:data:`MAX_SPOOL_BACKOFF_S`): never reported as failed, never lost;
- a batch still in the air at shutdown: released, for this process's successor.

What a hard crash (SIGKILL, OOM, power) can lose: the events tracked in the last
:data:`SPOOL_WRITE_S` that were still in memory (power: also the last transactions SQLite had
not synced, with ``synchronous=NORMAL``). A batch in the air when its process died is sent
again by the adopter: the same bytes, the same ``messageId``s.

Counting: every event this process tracked is sent, failed, dropped or queued, and queued
includes ``spooled`` (this process's rows on disk, in flight or waiting); events adopted from
dead processes are counted in ``adopted``: ``tracked + adopted == sent + failed + dropped +
queued``. A process only ever drops its own spooled events (the byte cap makes room from the
appender's oldest rows), so each process's books are exact.

When the spool cannot be used (unwritable directory, full disk, an error SQLite cannot
recover from) this process falls back to the memory queue with one warning: the background
transport's behaviour exactly; rows already on disk wait there for a successor.

The transport is :class:`~klime.transports.background.Pump` (the background transport's
sender threads, limit and flush) over a :class:`SpoolQueue`: the :class:`BatchQueue
<klime.transports.background.BatchQueue>` that claims batches from the spool, acks and
releases them as they settle, keeps the retry-at heap of released batches, owns the disk
side (:class:`~._spooler.DiskWriter`) and, once the spool is unusable, hands every call to
the :class:`~klime.transports.background.MemoryQueue` it holds (the deque ``submit``
fills). May import: the model, the delivery, the pump and the disk writer.
"""

from __future__ import annotations

import functools
import heapq
import os
import sys
import time
from collections import deque
from typing import Any, Deque, Dict, List, Optional, Tuple

from .._config import MAX_REQUEST_BYTES, MAX_RETRY_AFTER_S
from .._deadline import Deadline
from .._delivery import KEEP_TRANSIENT, Outcome
from .._logging import log
from .._retry import backoff_delay
from ..errors import ConfigurationError, SendError, SpoolUnavailable
from ..senders.base import Pace
from ._flights import Batch
from ._spooler import ADOPT_S, SPOOL_WRITE_S, DiskWriter
from .background import Goal, MemoryQueue, Pump

__all__ = ["SpoolTransport", "SPOOL_WRITE_S", "ADOPT_S", "MAX_SPOOL_BACKOFF_S"]

#: The disk part of a flush goal that has none (a flush on klime's own thread).
_MEMORY_ONLY = -1

#: A spooled batch's place in the memory queue's numbering: none (a flush waiting for
#: memory events never waits for it).
_OFF_THE_BOOKS = sys.maxsize

#: Longest wait before a released batch is tried again, seconds.
MAX_SPOOL_BACKOFF_S = MAX_RETRY_AFTER_S

_TO_BE_CLAIMED = object()  # marks a batch to be filled from the spool by the thread that flies it
_wall = time.time
_monotonic = time.monotonic


def _known_outcome(error: SendError) -> bool:
    """True when a failure is the server's final word on its events (a 4xx, or a 2xx that
    names rejected events) or transient (its events came back in ``unsent``); False for an
    outcome nobody can vouch for: no status and no response (the sender raised, the
    request could not be made), or a 5xx that was not retried."""
    if error.response is not None or error.retryable:
        return True
    status = error.status_code
    return status is not None and 400 <= status < 500


def _first_unknown(outcome: Outcome) -> str:
    for error in outcome.errors or ():
        if not _known_outcome(error):
            return str(error.message)[:200]
    return "?"  # pragma: no cover - called only when there is one


class SpoolQueue:
    """The spool as a :class:`~klime.transports.background.BatchQueue` (see the module).

    ``memory`` is the deque ``submit`` fills; :class:`DiskWriter` moves it to disk. Once the
    spool is unusable (:attr:`DiskWriter.degraded`) every call is the memory queue's.
    Guarded by the pump's lock, like the disk writer's counters.
    """

    def __init__(
        self,
        memory: MemoryQueue,
        *,
        directory: str,
        max_bytes: int,
        project: Optional[str],
        retry_initial_delay: float,
    ) -> None:
        self.memory = memory
        self.directory = directory
        self.max_bytes = max_bytes
        self.project = project
        self.retry_initial_delay = retry_initial_delay
        self.max_batch_size = memory.max_batch_size
        # a burst that would fill the memory queue before the next write is written at once
        self._write_at = max(memory.max_batch_size, memory.max_queue_size // 4)
        # the rest is set by reset(), which the pump calls at once

    def reset(self, pump: Pump) -> None:
        self.memory.reset(pump)
        self._pump = pump
        self._lock = pump.lock
        self._flights = pump.flights
        self.writer = DiskWriter(
            self, pump.lock, directory=self.directory, max_bytes=self.max_bytes, project=self.project
        )
        self._due_on_disk = 0  # rows believed due now (appended or adopted, not yet claimed)
        self._retry_at: List[float] = []  # a heap: when released batches are due again
        self._partial_ok = False  # a partial batch may be claimed (interval, flush, stop)
        self._claimed_total = self._settled_total = 0  # events claimed / settled and counted
        self._reserved = 0  # events batches in the air will claim (taken, not claimed yet)

    def start(self) -> None:
        self.writer.start()

    def full_batch_locked(self, size: int) -> None:
        if self.writer.degraded:
            self.memory.full_batch_locked(size)
        elif size >= self._write_at:
            # the spooler writes every SPOOL_WRITE_S anyway; a burst that would fill the
            # memory queue before then is written at once (fewer, larger transactions, and
            # less for the caller's thread to do than a wake-up per batch)
            self.writer.wake()

    # ------------------------------------------------------------------ taking and settling

    def take_locked(self) -> Optional[Batch]:
        """A batch to be filled from the spool by the thread that flies it (see
        :meth:`send`), when rows are due; the memory queue's once the spool is unusable."""
        if self.writer.degraded:
            return self.memory.take_locked()
        flights = self._flights
        if not flights.room_locked():
            return None
        retry = self._retry_at
        if retry and retry[0] <= _wall():
            heapq.heappop(retry)
            self._due_on_disk += self.max_batch_size  # a released batch is due: worth a claim
        full = self._due_on_disk >= self.max_batch_size
        if not full:
            if not self._due_on_disk or not (self._partial_ok or self._pump.stopping) or flights.flying:
                return None
        self._due_on_disk = max(0, self._due_on_disk - self.max_batch_size)
        self._reserved += self.max_batch_size
        batch = Batch(_OFF_THE_BOOKS, [])
        batch.spool_rows = _TO_BE_CLAIMED
        return flights.mark_sending_locked(batch)

    def takeable_locked(self) -> int:
        if self.writer.degraded:
            return self.memory.takeable_locked()
        room = self._flights.limit.limit - len(self._flights.flying)
        return max(0, min(room, self._due_on_disk // self.max_batch_size))

    def send(self, batch: Batch, deadline: Deadline, pace: Pace) -> None:
        """Claim the batch's rows, send them, settle them on disk. Blocks; never raises."""
        if batch.spool_rows is not _TO_BE_CLAIMED:  # taken from memory (the spool unusable)
            self.memory.send(batch, deadline, pace)
            return
        pump = self._pump
        disk = self.writer.spool()
        claimed = None
        try:
            if disk is not None:
                claimed = disk.claim(
                    self.max_batch_size, min(MAX_REQUEST_BYTES, pump.delivery.sender.max_batch_bytes)
                )
        except SpoolUnavailable as exc:
            self.writer.degrade(exc)
        if not claimed:
            with self._lock:
                self._reserved -= self.max_batch_size
                self._due_on_disk = 0  # nothing (more) due on disk now
                self._partial_ok = False
                self._flights.settle_locked(batch, [], batch.retry, None)
                pump.settled.notify_all()
            return
        with self._lock:  # all at once: a flush tells "claimed, in the air" from these
            batch.events = list(claimed.events)
            batch.spool_rows = claimed
            self._claimed_total += len(claimed)
            self._reserved -= self.max_batch_size
            if len(claimed) < self.max_batch_size:
                self._due_on_disk, self._partial_ok = 0, False
        try:
            pump.delivery.send(
                batch.events,
                deadline,
                settle=functools.partial(self._settle, batch),
                pace=pace,
                keep=KEEP_TRANSIENT,
            )
        except Exception:  # Delivery never raises; the rows stay claimed for an adopter
            log.exception("klime: sending a spooled batch failed unexpectedly")
        finally:
            with self._lock:  # counted by now: a flush waiting for it may look
                self._settled_total += len(claimed)

    def _settle(self, batch: Batch, outcome: Outcome) -> bool:
        """Settle a batch's rows on disk: delete what was delivered or refused for good,
        release what comes back (after a backoff when its retries ran out)."""
        with self._lock:
            if not self._flights.settle_locked(batch, [], batch.retry, None):
                return False
        claimed: Any = batch.spool_rows
        unknown = any(not _known_outcome(error) for error in outcome.errors or ())
        if unknown:
            # An outcome nobody can vouch for (the sender raised, a body it could not read,
            # a request never made): the whole batch stays on disk, due after a backoff.
            # Nothing of it is counted or reported here (False: the Delivery drops this
            # outcome); events of it that did arrive are sent again, same messageIds.
            positions = list(range(len(claimed)))
        else:
            back_ids = {id(event) for event in outcome.unsent or ()}
            positions = [i for i, event in enumerate(claimed.events) if id(event) in back_ids]
        back, done = claimed.split(positions)
        retry_at = _wall()
        if outcome.exhausted or unknown:
            # a batch whose retries ran out after n attempts waits as after n + 1 failures
            retry_at += backoff_delay(back.max_attempts + 1, self.retry_initial_delay, MAX_SPOOL_BACKOFF_S)
        disk = self.writer.disk
        try:
            if done:
                disk.ack(done)
            if back:
                disk.release(back, retry_at=retry_at)
        except SpoolUnavailable as exc:  # the rows stay claimed: a successor adopts them
            self.writer.degrade(exc)
        with self._lock:
            self.writer.settled_locked(len(done))
            if back:
                if outcome.exhausted or unknown:
                    heapq.heappush(self._retry_at, retry_at)
                else:
                    self._due_on_disk += len(back)
            self._flights.work.notify_all()
        if unknown:
            log.warning_once(
                "spool-unknown-outcome",
                "klime: a spooled batch had an outcome that cannot be trusted (%s); its events "
                "stay in the spool and are tried again",
                _first_unknown(outcome),
            )
        return not unknown

    def release_locked(self) -> None:
        self.memory.release_locked()
        self._partial_ok = True

    def wake_in_locked(self) -> float:
        retry = self._retry_at
        return max(0.0, retry[0] - _wall()) if retry else self.memory.wake_in_locked()

    def before_drain(self) -> None:
        self.writer.write()  # (nothing once the spool is unusable)

    # ------------------------------------------------------------------ flush / shutdown

    def begin_flush(self, *, blocking: bool = True) -> Goal:
        """Everything tracked so far goes to disk (``blocking``); the goal is then the
        memory queue's and, on disk, what is claimed or due now (an upper bound)."""
        memory_goal = self.memory.begin_flush()
        if not blocking:  # a callback's flush, on klime's own thread: the memory queue's part
            return (memory_goal[0], _MEMORY_ONLY)
        self.writer.write()
        with self._lock:
            disk_goal = self._claimed_total + self._reserved + self._due_on_disk
            self._partial_ok = True
            self._flights.work.notify_all()
        return (memory_goal[0], disk_goal)

    def settled_locked(self, goal: Goal) -> bool:
        """The memory queue's part is settled, and on disk what was due is sent or
        released (what is in the air may free more to send: it is waited for)."""
        if not self.memory.settled_locked(goal):
            return False
        if self.writer.degraded or self._settled_total >= goal[1]:
            return True
        claiming = any(b.spool_rows is _TO_BE_CLAIMED for b in self._flights.flying)
        if self._settled_total < self._claimed_total or claiming:
            return False
        due = bool(self._retry_at) and self._retry_at[0] <= _wall()
        return not self._due_on_disk and not due

    def recheck_in_locked(self) -> Optional[float]:
        return 0.05  # a released batch falls due without a notify

    def unsent_locked(self, goal: Goal) -> int:
        if self.writer.degraded or goal[1] == _MEMORY_ONLY:
            return self.memory.unsent_locked(goal)
        return self.counts_locked()["pending"]

    def discard_locked(self, flush: bool) -> Tuple[List[bytes], List[Batch]]:
        if self.writer.degraded:
            return self.memory.discard_locked(flush)
        return [], []  # to disk, even with flush=False: durability is the point

    def close(self, deadline: Deadline) -> bool:
        """What is still in memory goes to disk, even past the deadline; batches still in
        the air are released for this process's successor. False once the spool is
        unusable: the pump reports what is left, as the background transport does."""
        if self.writer.degraded:
            return False
        self.writer.join(deadline.remaining())
        self.writer.write()
        if self.writer.degraded:
            return False
        with self._lock:
            abandoned, _ = self._flights.abandon_locked()
        disk = self.writer.disk
        for batch in abandoned:  # still in the air: given back, for this process's successor
            claimed = batch.spool_rows
            if claimed is not _TO_BE_CLAIMED and claimed is not None and disk is not None:
                try:
                    disk.release(claimed, retry_at=_wall())
                except SpoolUnavailable:
                    pass
        if disk is not None:
            disk.close()
        return True

    def counts_locked(self) -> Dict[str, int]:
        counts = self.memory.counts_locked()
        writer = self.writer
        counts["pending"] += writer.moving_to_disk + writer.spooled
        counts["spooled"] = writer.spooled
        counts["adopted"] = writer.adopted
        return counts

    # ------------------------------------------------------------------ for the disk writer (SpoolHost)

    def _take_queue_locked(self) -> Deque[bytes]:
        memory = self.memory
        events = memory.events
        if events:
            memory.events = deque()
            memory.left += len(events)
        return events

    def _give_back_locked(self, events: Deque[bytes]) -> None:
        memory = self.memory
        memory.events.extendleft(reversed(events))
        memory.left -= len(events)
        self._flights.work.notify_all()

    def _rows_due_locked(self, rows: int) -> None:
        self._due_on_disk = max(0, self._due_on_disk + rows)
        flights = self._flights
        if flights.idle:
            flights.work.notify(max(1, rows // self.max_batch_size))
        elif not flights.flying and rows:
            flights.work.notify()

    def _spool_unusable_locked(self) -> None:
        self._flights.work.notify_all()

    def _writer_may_stop_locked(self) -> bool:
        return self._pump.stopping and not self.memory.events

    def _drop_from_disk(self, events: List[bytes], reason: str) -> None:
        self._pump.delivery.drop(events, reason, notice=False)


class SpoolTransport(Pump):
    """The background transport's pump over a durable spool in ``directory`` (see the
    module).

    Args:
        directory: the spool's directory (created with mode 0o700); every process of the
            app may share it.
        max_bytes: cap on the spool's event bytes (all processes together); beyond it each
            appender drops its own oldest spooled events (counted, reported, one warning
            per episode).
        retry_initial_delay: seconds before a released batch's first retry; doubles per
            failed round, capped at :data:`MAX_SPOOL_BACKOFF_S`.
        project: the fingerprint of the endpoint and write key the events go to
            (:func:`klime.spool.project_id`); this process adopts only the rows of gone
            processes of the same project. None: the fixed ``"default"`` project (which also
            adopts rows of a klime from before projects).
        others: as :class:`~klime.transports.background.BackgroundTransport`.

    ``submit`` is the background transport's (thread-safe, microseconds, no I/O); ``flush``
    blocks until everything tracked before it is on disk and what was due is sent or
    released for a later retry; ``shutdown`` leaves what it could not send on disk (what is
    still in memory is written first, even with ``flush=False``).
    """

    name = "spool"

    def __init__(
        self,
        directory: str,
        *,
        max_bytes: Optional[int] = None,
        retry_initial_delay: float = 1.0,
        project: Optional[str] = None,
        **options: Any,
    ) -> None:
        from ..spool import DEFAULT_MAX_BYTES

        if project is not None and (not isinstance(project, str) or not project):
            raise ConfigurationError("spool project must be a non-empty string (see klime.spool.project_id)")
        self.directory = os.fspath(directory)
        self.project = project
        self.spool_max_bytes = int(max_bytes) if max_bytes is not None else DEFAULT_MAX_BYTES
        self.retry_initial_delay = max(0.0, float(retry_initial_delay))
        super().__init__(
            functools.partial(
                SpoolQueue,
                directory=self.directory,
                max_bytes=self.spool_max_bytes,
                project=self.project,
                retry_initial_delay=self.retry_initial_delay,
            ),
            **options,
        )

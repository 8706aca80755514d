"""The background transport's book of events dropped for room, and their reporting.

When the queue is full, ``submit`` drops the OLDEST event and counts it at once (the
caller's thread: microseconds, no I/O). The dropped events wait here until a klime thread
hands them to ``on_error``, at most :data:`REPORT_SLICE` at a time (bounded memory and GIL
time per report): the sender threads after each batch, or the ``klime-reporter`` thread,
started at the first overflow, so that they are reported promptly even while every sender
is stuck in a request. The start of an overflow episode is said once (a WARNING record,
and stderr without logging: :meth:`klime._logging._Log.notice`), its end once with the
count. Nothing is kept when no ``on_error`` would receive the events: only counted.

Book-keeping for ``flush``: each report remembers the sequence number of its first event,
so "everything queued before this call is resolved" can still be decided
(:meth:`DroppedEvents.settled_locked`).

Shares the transport's lock (methods named ``*_locked`` need it held). May import: the
model (``_logging``) only; the transport hands in its delivery.
"""

from __future__ import annotations

import threading
from threading import Thread
from typing import TYPE_CHECKING, Callable, List, Optional

from .._logging import log

if TYPE_CHECKING:
    from .._delivery import Delivery

__all__ = ["DroppedEvents", "EPISODE_OVERFLOW", "REPORT_SLICE"]

#: Dropped events are handed to on_error at most this many at a time.
REPORT_SLICE = 1000

#: The loss episode of a full queue (see klime._logging).
EPISODE_OVERFLOW = "loss-overflow"


class DroppedEvents:
    """Events dropped for room, counted, not yet reported. See the module docstring.

    ``delivery`` gives the transport's delivery; ``queue_has_room`` tells (holding the lock)
    whether the queue has room again, which ends an episode; ``stopping`` whether the
    transport is stopping (the reporter thread ends).
    """

    def __init__(
        self,
        lock: threading.Lock,
        settled: threading.Condition,
        *,
        max_queue_size: int,
        delivery: Callable[[], Delivery],
        queue_has_room: Callable[[], bool],
        stopping: Callable[[], bool],
    ) -> None:
        self.lock = lock
        self._delivery = delivery
        self.settled = settled
        self.max_queue_size = max_queue_size
        self._room = queue_has_room
        self._stopping = stopping
        self.held: List[bytes] = []  # dropped (and counted), not yet reported
        self.unheld = 0  # dropped with nobody to hand them to: counted, not kept
        self.first = 0  # the sequence number of the oldest held event
        self.reporting: List[int] = []  # first sequence numbers of reports in progress
        self.episode = 0  # events dropped in the current episode
        self.reporter: Optional[Thread] = None
        self.wake = threading.Event()

    def add_locked(self, event: bytes, seq: int, *, keep: bool) -> None:
        """``event`` (sequence number ``seq``) was dropped for room (and counted in the
        ledger by the transport): keep it for ``on_error`` when ``keep``. Microseconds; the
        caller's thread."""
        if keep:
            if not self.held:
                self.first = seq
            self.held.append(event)
        else:
            self.unheld += 1

    def report_soon(self) -> None:
        """Have the dropped events reported now, by the ``klime-reporter`` thread (started
        here the first time). Non-blocking but for starting that thread once."""
        reporter = self.reporter
        if reporter is None:
            with self.lock:
                reporter = self.reporter
                if reporter is None:
                    reporter = self.reporter = Thread(target=self._run, name="klime-reporter", daemon=True)
                else:
                    reporter = None
            if reporter is not None:
                try:
                    reporter.start()
                except RuntimeError:  # interpreter shutdown: the next drain reports them
                    return
        wake = self.wake
        if not wake.is_set():  # set already: the reporter has not cleared it, so the report
            wake.set()  # it is about to make includes what was just added

    def _run(self) -> None:
        while True:
            self.wake.wait()
            self.wake.clear()
            try:
                self.report()
            except Exception:  # never expected (callbacks are guarded)
                log.exception("klime: reporting dropped events failed")
            with self.lock:
                if self._stopping() and not self.held:
                    return

    def report(self) -> None:
        """Hand the dropped events to ``on_error``, :data:`REPORT_SLICE` per call; say the
        start of an episode, log its end. Blocks for the callbacks; thread-safe."""
        if not (self.held or self.unheld or self.episode):
            return  # the common case, read without the lock: nothing dropped lately
        while True:
            with self.lock:
                dropped = self.held
                unheld, self.unheld = self.unheld, 0
                if not dropped and not unheld:
                    if self.episode and self._room():
                        total, self.episode = self.episode, 0
                        log.end_episode(EPISODE_OVERFLOW)
                        log.warning("klime: the queue has room again; %d events were dropped", total)
                    return
                if len(dropped) > REPORT_SLICE:  # bound the memory and GIL time of one report
                    dropped, self.held = dropped[:REPORT_SLICE], dropped[REPORT_SLICE:]
                    first = self.first
                    # a lower bound of the next one's sequence number: flush may wait a
                    # little longer, never return early
                    self.first = first + REPORT_SLICE
                else:
                    self.held = []
                    first = self.first
                self.reporting.append(first)
                self.episode += len(dropped) + unheld
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
                    self._delivery().drop(dropped, reason, counted=True, notice=False)
                if unheld:
                    log.error("klime: %d events not delivered: %s", unheld, reason)
            finally:
                with self.lock:
                    self.reporting.remove(first)
                    self.settled.notify_all()

    def settled_locked(self, target: int) -> bool:
        """Are all dropped events with sequence number < ``target`` reported?"""
        return (not self.held or self.first >= target) and all(first >= target for first in self.reporting)

    def unsettled_locked(self, target: int) -> int:
        """Dropped events with sequence number < ``target`` not yet reported (an upper bound)."""
        if self.held and self.first < target:
            return min(len(self.held), target - self.first)
        return 0

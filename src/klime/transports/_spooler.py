"""The disk side of the spool transport (a mixin of
:class:`~klime.transports.spooled.SpoolTransport`): opening the spool, moving the memory
queue to it, adopting what processes that are gone left, and falling back to memory when
the spool cannot be used.

``klime-spooler`` (one thread per process, started with the first sender thread) writes
what the deque holds to the spool every :data:`SPOOL_WRITE_S` and when woken (a quarter of
``max_queue_size`` waiting), in one transaction each; opens the spool on first use and then
adopts the rows of dead owners (again every :data:`ADOPT_S`), giving freed pages back to the
file system. Appends that the byte cap answers with dropped events report them (one warning
per episode). Any :class:`~klime.errors.SpoolUnavailable` that the spool could not recover
from makes this process fall back to the memory queue, with one warning.

The methods use the transport's state under its lock (``_lock``, ``_queue``, ``_left``,
``_flights``, and the spool counters ``_moving_to_disk``/``_spooled``/``_due_on_disk``/``_adopted``).
May import: the model, the errors, :mod:`klime.spool` (lazily: ``import klime`` never
imports sqlite3).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from threading import Thread
from typing import TYPE_CHECKING, Any, Deque, Optional

from .._logging import log
from ..errors import SpoolUnavailable
from ._flights import Flights

if TYPE_CHECKING:
    from .._delivery import Delivery

__all__ = ["DiskQueue", "SPOOL_WRITE_S", "ADOPT_S", "EPISODE_SPOOL_FULL"]

_monotonic = time.monotonic

#: Events are on disk at most this long after ``track`` (or sooner: a full batch), seconds.
SPOOL_WRITE_S = 0.2
#: How often the spooler looks for rows of processes that are gone, seconds.
ADOPT_S = 5.0
#: The loss episode of a full spool (see klime._logging).
EPISODE_SPOOL_FULL = "loss-spool-full"


class DiskQueue:
    """The spool transport's disk side; see the module docstring. Not used on its own."""

    directory: str
    project: Optional[str]
    spool_max_bytes: int
    max_batch_size: int
    _lock: threading.Lock
    _queue: Deque[bytes]
    _left: int
    _flights: Flights
    _stopping: bool
    _disk: Any
    _degraded: bool
    _disk_lock: threading.Lock
    _write_lock: threading.Lock
    _writer: Optional[Thread]
    _write_wake: threading.Event
    _moving_to_disk: int
    _spooled: int
    _adopted: int
    _due_on_disk: int
    _next_adopt: float

    if TYPE_CHECKING:

        @property
        def delivery(self) -> Delivery: ...

    def _spool(self) -> Any:
        """The Spool (opened on first use); None once this process fell back to memory."""
        disk = self._disk
        if disk is not None or self._degraded:
            return disk
        opened = False
        with self._disk_lock:
            disk = self._disk
            if disk is None and not self._degraded:
                from ..spool import Spool

                try:
                    disk = self._disk = Spool.open(
                        self.directory, max_bytes=self.spool_max_bytes, project=self.project
                    )
                    opened = True
                except SpoolUnavailable as exc:
                    self._degrade(exc)
                    return None
        if opened:
            if disk.moved_aside:
                log.warning_once(
                    "spool-moved-aside",
                    "klime: the spool in %s was corrupt; it was moved aside to %s",
                    self.directory,
                    disk.moved_aside,
                )
            self._adopt(disk)  # what processes that are gone left: sent first
        return disk

    def _degrade(self, exc: SpoolUnavailable) -> None:
        """Fall back to the memory queue for the rest of this process; one warning."""
        with self._lock:
            if self._degraded:
                return
            self._degraded = True
            self._flights.work.notify_all()
        once = f"spool-unavailable:{self.directory}"  # one warning per spool directory
        if exc.reason in ("unsafe", "foreign"):
            log.warning_once(
                once,
                "klime: %s. The spool is NOT used: events are kept in memory only (a crash or "
                "a restart can lose them). Give the app a directory of its own (mode 0700, "
                "owned by the user it runs as)",
                str(exc).rstrip("."),
            )
            return
        log.warning_once(
            once,
            "klime: the spool in %s cannot be used (%s): events are kept in memory only "
            "from now on (a crash or a restart can lose them); events already on disk "
            "wait there for the next process",
            self.directory,
            exc.reason,
        )

    def _run_spooler(self) -> None:
        while True:
            self._write_wake.wait(SPOOL_WRITE_S)
            self._write_wake.clear()
            try:
                self._write()
                if _monotonic() >= self._next_adopt:
                    self._adopt()
            except Exception:  # never expected: the spool's failures are SpoolUnavailable
                log.exception("klime: the spooler failed")
            with self._lock:
                if self._degraded or (self._stopping and not self._queue):
                    return

    def _write(self) -> None:
        """Move what the deque holds to disk (the calling thread blocks for the
        transaction; never a caller of ``track``)."""
        with self._write_lock:
            with self._lock:
                if self._degraded or not self._queue:
                    return
                events = self._queue  # O(1) under the lock: track() never waits on a copy
                self._queue = deque()
                self._left += len(events)
                self._moving_to_disk += len(events)
            disk = self._spool()
            result = None
            try:
                if disk is not None:
                    result = disk.append(events)
            except SpoolUnavailable as exc:
                self._degrade(exc)
            with self._lock:
                self._moving_to_disk -= len(events)
                if result is None:  # nothing stored: back to the front of the memory queue
                    self._queue.extendleft(reversed(events))
                    self._left -= len(events)
                    self._flights.work.notify_all()
                    return
                kept = result.appended - result.dropped_count
                self._spooled += kept
                self._due_on_disk = max(0, self._due_on_disk + kept)
                self._wake_senders_locked(kept)
        if result.dropped:
            log.notice(
                EPISODE_SPOOL_FULL,
                "klime: the spool in %s is full (max_bytes=%d): this process's oldest spooled "
                "events are being dropped and reported to on_error",
                self.directory,
                self.spool_max_bytes,
            )
            self.delivery.drop(list(result.dropped), "spool full; event dropped", notice=False)
        else:
            log.end_episode(EPISODE_SPOOL_FULL)

    def _wake_senders_locked(self, rows: int) -> None:
        flights = self._flights
        if flights.idle:
            flights.work.notify(max(1, rows // self.max_batch_size))
        elif not flights.flying and rows:
            flights.work.notify()

    def _adopt(self, disk: Any = None) -> None:
        """Take over the rows of processes that are gone; give freed pages back."""
        if disk is None:
            disk = self._spool()
        if disk is None:
            return
        self._next_adopt = _monotonic() + ADOPT_S
        try:
            result = disk.adopt_events()
            disk.compact()
        except SpoolUnavailable as exc:
            self._degrade(exc)
            return
        moved, invalid = result.adopted, list(result.invalid)
        if moved or invalid:
            if moved:
                log.info("klime: took over %d spooled events of processes that are gone", moved)
            with self._lock:
                self._adopted += moved + len(invalid)
                self._spooled += moved
                self._due_on_disk += moved
                self._wake_senders_locked(moved)
        if invalid:  # never sent: counted as adopted and dropped, and reported
            log.warning_once(
                "spool-invalid-rows",
                "klime: the spool in %s held %d rows of processes that are gone that are not "
                "klime events; they were deleted, not sent, and reported to on_error",
                self.directory,
                len(invalid),
            )
            reason = "spooled row is not a valid klime event; deleted, not sent"
            self.delivery.drop(invalid, reason, notice=False)

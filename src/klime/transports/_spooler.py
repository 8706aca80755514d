"""The disk side of the spool transport: :class:`DiskWriter`, a component that the spool
queue (:class:`~klime.transports.spooled.SpoolQueue`) owns, opens the spool, moves the
memory queue to it, adopts what processes that are gone left, and falls back to memory when
the spool cannot be used.

``klime-spooler`` (one thread per process, started with the first sender thread) writes
what the deque holds to the spool every :data:`SPOOL_WRITE_S` and when woken (a quarter of
``max_queue_size`` waiting), in one transaction each; opens the spool on first use and then
adopts the rows of dead owners (again every :data:`ADOPT_S`), giving freed pages back to the
file system. Appends that the byte cap answers with dropped events report them (one warning
per episode). Any :class:`~klime.errors.SpoolUnavailable` that the spool could not recover
from makes this process fall back to the memory queue, with one warning.

The writer keeps its own state (the spool, whether this process fell back to memory, the
counters ``moving_to_disk``/``spooled``/``adopted``), guarded by the pump's lock, which
it is given. It reaches the spool queue only through :class:`SpoolHost`: take the memory
queue, give it back, announce rows due on disk, wake the senders, drop events.
May import: the model, the errors, :mod:`klime.spool` (lazily: ``import klime`` never
imports sqlite3).
"""

from __future__ import annotations

import threading
import time
from threading import Thread
from typing import Any, Deque, List, Optional, Protocol

from .._logging import log
from ..errors import SpoolUnavailable

__all__ = ["DiskWriter", "SpoolHost", "SPOOL_WRITE_S", "ADOPT_S", "EPISODE_SPOOL_FULL"]

_monotonic = time.monotonic

#: Events are on disk at most this long after ``track`` (or sooner: a full batch), seconds.
SPOOL_WRITE_S = 0.2
#: How often the spooler looks for rows of processes that are gone, seconds.
ADOPT_S = 5.0
#: The loss episode of a full spool (see klime._logging).
EPISODE_SPOOL_FULL = "loss-spool-full"


class SpoolHost(Protocol):
    """What the disk writer asks of the spool queue that owns it (each ``_locked`` method
    is called with the pump's lock held)."""

    def _take_queue_locked(self) -> Deque[bytes]:
        """Everything the memory queue holds, now off it (counted as left the queue)."""
        ...

    def _give_back_locked(self, events: Deque[bytes]) -> None:
        """Events that could not be stored: back to the front of the memory queue."""
        ...

    def _rows_due_locked(self, rows: int) -> None:
        """``rows`` more rows are due on disk now (appended or adopted): wake senders."""
        ...

    def _spool_unusable_locked(self) -> None:
        """The spool fell back to memory: the senders look at the memory queue again."""
        ...

    def _writer_may_stop_locked(self) -> bool:
        """The transport is stopping and nothing waits in memory."""
        ...

    def _drop_from_disk(self, events: List[bytes], reason: str) -> None:
        """Count events lost on disk as dropped and report them (no lock held)."""
        ...


class DiskWriter:
    """The spool transport's disk side (see the module docstring).

    Args:
        host: the spool queue that owns this writer.
        lock: the pump's lock, which guards this writer's counters and flags too.
        directory, max_bytes, project: the spool's (:meth:`klime.spool.Spool.open`).

    ``write``/``adopt``/``spool`` block on SQLite and are thread-safe; never called on a
    caller of ``track``. The counters are read and written under ``lock``.
    """

    def __init__(
        self,
        host: SpoolHost,
        lock: threading.Lock,
        *,
        directory: str,
        max_bytes: int,
        project: Optional[str],
    ) -> None:
        self._host = host
        self._lock = lock
        self.directory = directory
        self.max_bytes = max_bytes
        self.project = project
        self.disk: Any = None  # the Spool, opened on first use
        self.degraded = False  # this process fell back to the memory queue
        self.moving_to_disk = 0  # taken from the deque, not yet on disk
        self.spooled = 0  # this process's rows on disk (waiting, or in the air)
        self.adopted = 0  # rows taken over from processes that are gone
        self._disk_lock = threading.Lock()  # opening the spool
        self._write_lock = threading.Lock()  # one writer of the deque to disk at a time
        self._thread: Optional[Thread] = None  # klime-spooler
        self._wake = threading.Event()
        self._next_adopt = 0.0

    # ------------------------------------------------------------------ the thread

    def start(self) -> None:
        """Start ``klime-spooler`` once (not at interpreter shutdown: the flushing thread
        writes then). Thread-safe enough: called once the pump's first sender thread started."""
        if self._thread is not None:
            return
        thread = self._thread = Thread(target=self._run, name="klime-spooler", daemon=True)
        try:
            thread.start()
        except RuntimeError:  # interpreter shutdown: the flushing thread writes
            pass

    def wake(self) -> None:
        """Write soon (a burst fills the memory queue). Non-blocking, thread-safe."""
        self._wake.set()

    def join(self, timeout: Optional[float]) -> None:
        """Wait for ``klime-spooler`` to end (it ends once the transport stops), at most
        ``timeout`` seconds; does nothing on that thread itself."""
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def settled_locked(self, rows: int) -> None:
        """``rows`` of this process's rows left the spool (delivered or refused)."""
        self.spooled -= rows

    # ------------------------------------------------------------------ the disk

    def spool(self) -> Any:
        """The Spool (opened on first use); None once this process fell back to memory."""
        disk = self.disk
        if disk is not None or self.degraded:
            return disk
        opened = False
        with self._disk_lock:
            disk = self.disk
            if disk is None and not self.degraded:
                from ..spool import Spool

                try:
                    disk = self.disk = Spool.open(
                        self.directory, max_bytes=self.max_bytes, project=self.project
                    )
                    opened = True
                except SpoolUnavailable as exc:
                    self.degrade(exc)
                    return None
        if opened:
            if disk.moved_aside:
                log.warning_once(
                    "spool-moved-aside",
                    "klime: the spool in %s was corrupt; it was moved aside to %s",
                    self.directory,
                    disk.moved_aside,
                )
            self.adopt(disk)  # what processes that are gone left: sent first
        return disk

    def degrade(self, exc: SpoolUnavailable) -> None:
        """Fall back to the memory queue for the rest of this process; one warning."""
        with self._lock:
            if self.degraded:
                return
            self.degraded = True
            self._host._spool_unusable_locked()
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

    def _run(self) -> None:
        while True:
            self._wake.wait(SPOOL_WRITE_S)
            self._wake.clear()
            try:
                self.write()
                if _monotonic() >= self._next_adopt:
                    self.adopt()
            except Exception:  # never expected: the spool's failures are SpoolUnavailable
                log.exception("klime: the spooler failed")
            with self._lock:
                if self.degraded or self._host._writer_may_stop_locked():
                    return

    def write(self) -> None:
        """Move what the deque holds to disk (the calling thread blocks for the
        transaction; never a caller of ``track``)."""
        with self._write_lock:
            with self._lock:
                if self.degraded:
                    return
                events = self._host._take_queue_locked()  # O(1): track() never waits on a copy
                if not events:
                    return
                self.moving_to_disk += len(events)
            disk = self.spool()
            result = None
            try:
                if disk is not None:
                    result = disk.append(events)
            except SpoolUnavailable as exc:
                self.degrade(exc)
            with self._lock:
                self.moving_to_disk -= len(events)
                if result is None:  # nothing stored: back to the front of the memory queue
                    self._host._give_back_locked(events)
                    return
                kept = result.appended - result.dropped_count
                self.spooled += kept
                self._host._rows_due_locked(kept)
        if result.dropped:
            log.notice(
                EPISODE_SPOOL_FULL,
                "klime: the spool in %s is full (max_bytes=%d): this process's oldest spooled "
                "events are being dropped and reported to on_error",
                self.directory,
                self.max_bytes,
            )
            self._host._drop_from_disk(list(result.dropped), "spool full; event dropped")
        else:
            log.end_episode(EPISODE_SPOOL_FULL)

    def adopt(self, disk: Any = None) -> None:
        """Take over the rows of processes that are gone; give freed pages back."""
        if disk is None:
            disk = self.spool()
        if disk is None:
            return
        self._next_adopt = _monotonic() + ADOPT_S
        try:
            result = disk.adopt_events()
            disk.compact()
        except SpoolUnavailable as exc:
            self.degrade(exc)
            return
        moved, invalid = result.adopted, list(result.invalid)
        if moved or invalid:
            if moved:
                log.info("klime: took over %d spooled events of processes that are gone", moved)
            with self._lock:
                self.adopted += moved + len(invalid)
                self.spooled += moved
                self._host._rows_due_locked(moved)
        if invalid:  # never sent: counted as adopted and dropped, and reported
            log.warning_once(
                "spool-invalid-rows",
                "klime: the spool in %s held %d rows of processes that are gone that are not "
                "klime events; they were deleted, not sent, and reported to on_error",
                self.directory,
                len(invalid),
            )
            reason = "spooled row is not a valid klime event; deleted, not sent"
            self._host._drop_from_disk(invalid, reason)

"""The :class:`Spool` object: one owner of a spool, thread-, fork- and failure-safe."""

from __future__ import annotations

import math
import os
import sqlite3
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple, TypeVar

from .._config import MAX_BATCH_EVENTS, MAX_REQUEST_BYTES
from .._logging import log
from .._retry import backoff_delay
from ..errors import ConfigurationError, SpoolUnavailable
from . import _fork, _owners, _queue, _safety, _store
from ._admin import read_stats
from ._models import AdoptResult, AppendResult, Claimed, SpoolStats
from ._store import DEFAULT_BUSY_TIMEOUT_S, classify, unavailable

__all__ = ["Spool", "retry_time", "DEFAULT_MAX_BYTES", "DEFAULT_BUSY_TIMEOUT_S"]

T = TypeVar("T")

DEFAULT_MAX_BYTES = 100 * 1024 * 1024
_COUNTERS = (
    "appended",
    "dropped",
    "dropped_bytes",
    "claimed",
    "acked",
    "rejected",
    "released",
    "adopted",
    "invalid",
)


def retry_time(attempts: int, initial: float, maximum: float, *, now: Optional[float] = None) -> float:
    """The unix time to pass as :meth:`Spool.release`'s ``retry_at`` after ``attempts``
    failed attempts: ``now`` plus klime's one backoff (:func:`klime._retry.backoff_delay`),
    in seconds. Pure."""
    return (time.time() if now is None else now) + backoff_delay(attempts, initial, maximum)


class Spool:
    """A durable queue of encoded events in a directory, shared by the app's processes.

    Open with :meth:`open`. Each open spool is an *owner*: it appends rows as its own, claims
    only its own rows (including those it adopted from dead owners), and settles each claimed
    batch with :meth:`ack` (sent), :meth:`release` (try again later) or :meth:`reject`
    (failed for good). Rows of processes that are gone are taken over by :meth:`adopt`.

    Thread-safe: one connection per process, used by one thread at a time under a lock.
    Fork-safe: a forked child never touches the parent's connection or owner identity; the
    same object becomes a new owner in the child on first use (pid checked on every call,
    plus ``os.register_at_fork``). Every operation blocks for its SQLite work (tens to
    hundreds of microseconds) and, while another process holds the write lock, up to
    ``busy_timeout`` seconds: call it from klime's own thread, never a request thread.
    Every storage failure raises :class:`~klime.errors.SpoolUnavailable` (the object stays
    usable: a transient reason may clear up); wrong arguments raise TypeError/ValueError.
    """

    def __init__(
        self,
        directory: str,
        *,
        max_bytes: int,
        busy_timeout: float,
        synchronous: str,
        clock: Callable[[], float],
        project: str = _safety.DEFAULT_PROJECT,
        adopt_legacy: bool = True,
    ) -> None:
        """Use :meth:`open`."""
        self.directory = directory
        #: The project this owner belongs to (:func:`klime.spool.project_id`).
        self.project = project
        self.adopt_legacy = adopt_legacy
        self.max_bytes = max_bytes
        self._owners_dir = os.path.join(directory, _owners.OWNERS_DIR)
        self._busy_timeout = busy_timeout
        self._synchronous = synchronous
        self._clock = clock
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._db: Optional[_store.Database] = None
        self._owner: Optional[_owners.OwnerLock] = None
        self._me: Optional[_queue.Owner] = None
        self._closed = False
        self._orphans_checked = False
        self._counters: Dict[str, int] = dict.fromkeys(_COUNTERS, 0)
        #: Where a corrupt database was moved aside the last time this spool started afresh.
        self.moved_aside: Optional[str] = None

    @classmethod
    def open(
        cls,
        directory: str | os.PathLike[str],
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT_S,
        synchronous: str = "NORMAL",
        clock: Callable[[], float] = time.time,
        project: Optional[str] = None,
        adopt_legacy: Optional[bool] = None,
    ) -> Spool:
        """Open the spool in ``directory`` (created with mode 0o700) and register as an owner.

        The directory must be private to this user (not a symlink, owned by the effective
        uid, not writable by group or others; the same for klime's files in it), else
        SpoolUnavailable(``"unsafe"``); a ``spool.sqlite3`` there that is not klime's raises
        SpoolUnavailable(``"foreign"``) and is left alone. Files klime creates are 0600.
        ``project``: the fingerprint of the endpoint and write key this owner sends to
        (:func:`klime.spool.project_id`); None is the fixed ``"default"`` project. Only rows
        of gone owners of the same project are adopted. ``adopt_legacy``: also adopt rows
        that record no endpoint and key (written by a klime from before projects, or by an
        owner of the ``"default"`` project); by default only the ``"default"`` project does
        (see docs/spool.md, Security).

        ``max_bytes``: cap on the events' bytes in the whole spool (all processes together);
        an append beyond it drops the appending owner's oldest unclaimed rows.
        ``busy_timeout`` (seconds): how long
        an operation waits for another process's write lock before SpoolUnavailable
        ("locked"). ``synchronous``: ``"NORMAL"`` (a process crash loses nothing committed; a
        power cut may lose the last transactions, never the file) or ``"FULL"`` (an fsync per
        commit: nothing committed is lost). ``clock``: unix time, replaceable in tests.

        A corrupt database is moved aside (``spool.sqlite3.corrupt-<UTC time>``, logged as a
        warning, named by :attr:`moved_aside`) and a fresh one started. Does not adopt: call
        :meth:`adopt`. Blocks up to ``busy_timeout`` for the open lock, plus the open itself
        (about a millisecond; a migration longer). Raises ConfigurationError for bad options,
        SpoolUnavailable for everything else.
        """
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
            raise ConfigurationError("spool max_bytes must be a positive number of bytes")
        if isinstance(busy_timeout, bool) or not isinstance(busy_timeout, (int, float)):
            raise ConfigurationError("spool busy_timeout must be a number of seconds")
        if not 0 <= busy_timeout < math.inf:
            raise ConfigurationError("spool busy_timeout must be a finite number of seconds, 0 or more")
        sync = str(synchronous).upper()
        if sync not in _store.SYNCHRONOUS:
            raise ConfigurationError('spool synchronous must be "NORMAL" or "FULL"')
        if project is not None and (not isinstance(project, str) or not project):
            raise ConfigurationError("spool project must be a non-empty string (see klime.spool.project_id)")
        project_name = _safety.DEFAULT_PROJECT if project is None else project
        legacy = project_name == _safety.DEFAULT_PROJECT if adopt_legacy is None else bool(adopt_legacy)
        path = os.path.abspath(os.fspath(directory))
        if not _owners.available():
            raise SpoolUnavailable(
                "klime spool: needs fcntl.flock (not on this platform)", "unsupported", path
            )
        spool = cls(
            path,
            max_bytes=max_bytes,
            busy_timeout=float(busy_timeout),
            synchronous=sync,
            clock=clock,
            project=project_name,
            adopt_legacy=legacy,
        )
        with spool._lock:
            spool._start()
        _fork.track(spool)
        return spool

    def __repr__(self) -> str:
        return f"Spool({self.directory!r}, owner={self.owner!r})"

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def owner(self) -> Optional[str]:
        """This owner's token (None in a forked child until its first call, or once closed)."""
        owner = self._owner
        return owner.token if owner is not None and self._pid == os.getpid() else None

    # ------------------------------------------------------------------ life cycle

    def _start(self, expected: Optional[Tuple[int, int]] = None) -> None:
        """Become an owner: lock file first, then the owners row. Caller holds the lock."""
        try:
            _store.make_directory(self.directory)  # every time: it may have been deleted since
            _safety.check_directory(self.directory)  # and replaced, or planted with files
            owner = _owners.OwnerLock.create(self._owners_dir)
        except OSError as exc:
            raise unavailable(exc, self.directory, "creating the spool directory and owner lock") from exc
        me = _owners.Identity.current()
        registered: List[_queue.Owner] = []
        try:
            db = _store.open_database(
                self.directory,
                busy_timeout=self._busy_timeout,
                synchronous=self._synchronous,
                expected=expected,
                setup=lambda conn: registered.append(
                    _queue.register(conn, owner.token, me, self._clock(), self.project)
                ),
            )
        except BaseException as exc:
            owner.release(unlink=True)
            if isinstance(exc, (sqlite3.Error, OSError)):
                raise unavailable(exc, self.directory, "registering an owner") from exc
            raise
        self._db, self._owner, self._me = db, owner, registered[-1]
        self._orphans_checked = False
        if db.moved_aside:
            self.moved_aside = db.moved_aside

    def _stop(self, *, unlink: bool) -> None:
        db, owner = self._db, self._owner
        self._db = self._owner = self._me = None
        if db is not None:
            try:
                db.conn.close()
            except sqlite3.Error:
                pass
        if owner is not None:
            owner.release(unlink=unlink)

    def _forked(self) -> None:
        """In a child: forget the parent's connection and lock, never closing or unlocking
        them; the next call registers this process as a new owner."""
        with _fork.guard():
            pid = os.getpid()
            if self._pid == pid:
                return
            self._lock = threading.Lock()
            if self._db is not None:
                _fork.abandon(self._db.conn)
                self._db = None
            if self._owner is not None:
                self._owner.forget()
                self._owner = None
            self._me = None
            self._counters = dict.fromkeys(_COUNTERS, 0)
            self._pid = pid

    def _guard(self) -> threading.Lock:
        if self._pid != os.getpid():  # forked, with or without Python's fork hooks (uWSGI)
            self._forked()
        return self._lock

    def _ready(self) -> Tuple[sqlite3.Connection, _queue.Owner]:
        """The connection and owner token, (re)starting as needed. Caller holds the lock."""
        if self._closed:
            raise SpoolUnavailable(f"klime spool {self.directory}: closed", "closed", self.directory)
        if self._db is not None and self._db.replaced():
            # Moved aside by a sibling after corruption, or deleted: this owner's rows went
            # with the old file. Start afresh as a new owner of the new one.
            log.warning("klime: the spool database in %s was replaced; reopening it", self.directory)
            self._stop(unlink=True)
        if self._db is None:
            self._start()
        assert self._db is not None and self._me is not None
        return self._db.conn, self._me

    def _call(self, action: str, run: Callable[[sqlite3.Connection, _queue.Owner], T]) -> T:
        with self._guard():
            conn, me = self._ready()
            try:
                return run(conn, me)
            except (sqlite3.Error, OSError) as exc:
                if classify(exc) != "corrupt":
                    raise unavailable(exc, self.directory, action) from exc
                failed = unavailable(exc, self.directory, action, recovered=True)
                db = self._db
                expected = (db.dev, db.ino) if db is not None else None
                self._stop(unlink=True)
                self._start(expected=expected)  # moves it aside; raises SpoolUnavailable if it cannot
                raise failed from exc

    def _count(self, **amounts: int) -> None:
        """Caller holds the lock."""
        for key, n in amounts.items():
            self._counters[key] += n

    def close(self) -> None:
        """Stop being an owner. Rows left (waiting for a retry, or claimed and never settled)
        stay for an adopter; an owner without rows leaves no trace. Settle claimed batches
        first: one still being sent when another process adopts it is sent again (same
        bytes, same messageId). Idempotent; never raises; blocks like an operation.
        Thread-safe. In a forked child it only marks this copy closed."""
        with self._guard():
            if self._closed:
                return
            self._closed = True
            _fork.untrack(self)
            if self._db is None or self._me is None:
                return
            empty = False
            try:
                empty = _queue.unregister_if_empty(self._db.conn, self._me)
            except sqlite3.Error as exc:
                log.debug("klime: closing the spool %s: %s", self.directory, exc)
            self._stop(unlink=empty)

    # ------------------------------------------------------------------ operations

    def append(self, events: Sequence[bytes]) -> AppendResult:
        """Store ``events`` (encoded JSON, opaque here) as this owner's rows, due now, in one
        transaction. Enforces the byte cap by dropping this owner's OLDEST unclaimed rows
        (never another owner's; possibly these very events) and returns them for reporting;
        an event larger than the whole cap is not stored and comes back as dropped. Blocks
        about 0.1 ms (20 events) to 0.4 ms (100), up to ``busy_timeout`` while another
        process writes. Thread-safe. Raises SpoolUnavailable (``"full"`` on a full disk:
        nothing of this call was stored), TypeError for items that are not bytes."""
        bodies: List[bytes] = []
        for event in events:
            if not isinstance(event, (bytes, bytearray, memoryview)):
                raise TypeError(f"spool events are encoded bytes, not {type(event).__name__}")
            bodies.append(bytes(event))
        if not bodies:
            return AppendResult(0)
        cap = self.max_bytes
        keep = [b for b in bodies if len(b) <= cap]
        too_big = [b for b in bodies if len(b) > cap]
        now = self._clock()

        def run(conn: sqlite3.Connection, me: _queue.Owner) -> List[bytes]:
            dropped = _queue.append(conn, me, now, keep, too_big, cap)
            self._count(appended=len(keep), dropped=len(dropped), dropped_bytes=sum(map(len, dropped)))
            return dropped

        return AppendResult(len(keep), tuple(self._call("appending", run)))

    def claim(
        self,
        max_events: int = MAX_BATCH_EVENTS,
        max_bytes: int = MAX_REQUEST_BYTES,
        *,
        include_waiting: bool = False,
    ) -> Claimed:
        """Claim a batch of this owner's unclaimed rows that are due (their next attempt time
        has come; ``include_waiting`` takes the others too), longest due first: fresh rows in
        the order they were appended, a released row from its ``retry_at``. At most
        ``max_events``, in a request body (``{"batch":[...]}``) of at most ``max_bytes``
        (always at least one event, whatever its size). Adopted rows are this owner's. An
        empty Claimed when nothing is due. No other process can claim these rows. Blocks
        about 0.1 ms (20 events) to 0.3 ms (100), up to ``busy_timeout`` under contention.
        Thread-safe. Raises SpoolUnavailable, ValueError for ``max_events < 1``."""
        if max_events < 1:
            raise ValueError("max_events must be at least 1")
        due_by = math.inf if include_waiting else self._clock()

        def run(conn: sqlite3.Connection, me: _queue.Owner) -> Claimed:
            claimed = _queue.claim(conn, me, due_by, int(max_events), int(max_bytes))
            self._count(claimed=len(claimed))
            return claimed

        return self._call("claiming", run)

    def _settle(
        self,
        claimed: Claimed,
        counter: str,
        action: str,
        op: Callable[[sqlite3.Connection, _queue.Owner], int],
    ) -> int:
        if not isinstance(claimed, Claimed):
            raise TypeError(f"expected a Claimed batch, not {type(claimed).__name__}")
        if not claimed:
            return 0

        def run(conn: sqlite3.Connection, me: _queue.Owner) -> int:
            if claimed.owner != me.token:
                return 0  # claimed under a former identity (before a fork or a restart)
            n = op(conn, me)
            self._count(**{counter: n})
            return n

        return self._call(action, run)

    def ack(self, claimed: Claimed) -> int:
        """The batch was accepted: delete its rows for good (an acked row never comes back).
        Returns the rows deleted (0 for a batch of another owner, or one already settled).
        Blocks about 0.05 to 0.2 ms, up to ``busy_timeout``. Thread-safe. Raises
        SpoolUnavailable."""
        return self._settle(
            claimed, "acked", "acknowledging", lambda conn, me: _queue.delete(conn, me, claimed)
        )

    def reject(self, claimed: Claimed) -> int:
        """The batch failed for good (a permanent error): delete its rows. Same contract as
        :meth:`ack`; counted apart."""
        return self._settle(
            claimed, "rejected", "rejecting", lambda conn, me: _queue.delete(conn, me, claimed)
        )

    def release(self, claimed: Claimed, *, retry_at: float) -> int:
        """The batch failed transiently: give its rows back, attempts + 1, due again at
        ``retry_at`` (unix time; :func:`retry_time` gives a capped exponential backoff; a
        time in the past means at once). Returns the rows released. Blocks like :meth:`ack`.
        Thread-safe. Raises SpoolUnavailable, ValueError for a time that is not finite."""
        at = float(retry_at)
        if not math.isfinite(at):
            raise ValueError("retry_at must be a finite unix time")
        return self._settle(
            claimed, "released", "releasing", lambda conn, me: _queue.release(conn, me, claimed, at)
        )

    def adopt(self) -> int:
        """Take over the rows of owners of this project whose process is gone (their lock is
        free): they become this owner's, unclaimed, their attempts kept, due now (at the
        latest). A row that was in flight when its owner died is sent again by its adopter
        (same bytes, same messageId). Racing adopters never take the same row. Rows that are
        not klime events are deleted, not adopted (see :meth:`adopt_events`). Also removes
        lock files nobody needs. Returns the rows adopted. Blocks O(rows adopted), in
        transactions of 2,000 rows, each waiting up to ``busy_timeout`` under contention;
        the first call also scans for rows of unregistered owners (O(rows)). Thread-safe.
        Raises SpoolUnavailable."""
        return self.adopt_events().adopted

    def adopt_events(self) -> AdoptResult:
        """:meth:`adopt`, also returning the rows it deleted instead of adopting: each
        adopted row must be a JSON object of at most 204,800 bytes with a known ``type``
        (track, identify, group) and a string ``messageId`` (:func:`_safety.valid_event`);
        one that is not is never sent: it is deleted (counted as dropped in the spool's
        totals) and returned in ``invalid`` for the caller to count and report. Rows of
        another project are left to that project. Blocks and raises as :meth:`adopt`."""

        def run(conn: sqlite3.Connection, me: _queue.Owner) -> AdoptResult:
            first = not self._orphans_checked
            moved, invalid = _queue.adopt(
                conn,
                self._owners_dir,
                me,
                orphans=first,
                now=self._clock(),
                legacy=self.adopt_legacy,
                valid=_safety.valid_event,
            )
            self._orphans_checked = True
            self._count(adopted=moved, invalid=len(invalid))
            if first and not self.adopt_legacy:
                left = _queue.legacy_rows(conn)
                if left:
                    log.warning_once(
                        "spool-legacy:" + self.directory,
                        "klime: the spool in %s holds %d events whose endpoint and write key were "
                        "not recorded (an older klime, or spool=DIR without a project); they are not sent "
                        "automatically (they may belong to another app sharing the directory): "
                        "send them with `klime spool %s --send` and the right write key",
                        self.directory,
                        left,
                        self.directory,
                    )
            return AdoptResult(moved, tuple(_safety.describe_invalid(body) for body in invalid))

        return self._call("adopting", run)

    def compact(self, max_pages: int = 1000) -> int:
        """Give up to ``max_pages`` free pages (4 KiB each) back to the file system, so that
        the file shrinks again after a backlog drained; a no-op (one read, ~10 µs) while 256
        or fewer are free. Returns the pages freed. Blocks 15 to 150 µs per page freed, holding
        the write lock: call it now and then (e.g. with :meth:`adopt`), on klime's thread.
        Thread-safe. Raises SpoolUnavailable."""
        return self._call("compacting", lambda conn, me: _queue.compact(conn, max_pages))

    def stats(self) -> SpoolStats:
        """A snapshot of the whole spool: totals, and per owner (alive or dead). Blocks for
        one pass over the rows (O(rows): milliseconds per 100,000) and a non-blocking lock
        probe per owner. Thread-safe. Raises SpoolUnavailable. For a cheap view of this
        process's own activity that never blocks, use :meth:`counters`."""
        return self._call(
            "reading statistics",
            lambda conn, me: read_stats(
                conn, self.directory, current=me.id, now=self._clock(), max_bytes=self.max_bytes
            ),
        )

    def counters(self) -> Dict[str, int]:
        """What this owner did since it opened (or since a fork): rows ``appended``,
        ``dropped`` (and ``dropped_bytes``) by the cap in its appends, ``claimed``, ``acked``,
        ``rejected``, ``released``, ``adopted``, ``invalid`` (rows of gone owners deleted by
        :meth:`adopt_events` instead of adopted). A plain dict copy; no I/O; never blocks."""
        return dict(self._counters)

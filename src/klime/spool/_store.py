"""The spool's SQLite file: opening, pragmas, schema and migrations, errors, corruption.

One database, ``<dir>/spool.sqlite3``, in WAL mode, shared by every process of the app.
``synchronous=NORMAL`` (the default here): a committed transaction survives a crash of the
*process* (it is in the WAL, in the OS page cache), but a power cut or kernel crash can roll
back the transactions committed since the last checkpoint (never a corrupt file; the
database stays consistent). ``synchronous=FULL`` syncs the WAL at every commit and loses
nothing to a power cut, at the cost of an fsync per operation.

Opening (and moving a corrupt file aside) happens under ``<dir>/open.lock`` (flock), so
processes starting together never race on migrations or on a recovery.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import stat
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator, List, Optional, Tuple

from .._logging import log
from ..errors import SpoolUnavailable
from . import _owners, _safety

__all__ = [
    "DB_NAME",
    "DEFAULT_BUSY_TIMEOUT_S",
    "SCHEMA_VERSION",
    "Database",
    "open_database",
    "connect_existing",
    "classify",
    "unavailable",
    "begin",
    "recognise",
    "APPLICATION_ID",
    "has_projects",
]

DB_NAME = "spool.sqlite3"
#: ``PRAGMA application_id`` of a klime spool ("KLMS"): marks the file as klime's.
APPLICATION_ID = 0x4B4C4D53
_SQLITE_MAGIC = b"SQLite format 3\x00"
#: The tables (and some of their columns) of a spool written by klime before the marker.
_LEGACY_SHAPE = {
    "owners": {"id", "token", "pid", "host", "opened"},
    "events": {"id", "owner", "created", "due", "attempts", "claimed", "size", "body"},
    "totals": {"id", "count", "bytes", "dropped_count", "dropped_bytes"},
}
DEFAULT_BUSY_TIMEOUT_S = 2.0
OPEN_LOCK = "open.lock"
SYNCHRONOUS = ("NORMAL", "FULL")
#: The WAL file is truncated back to this size after a checkpoint.
JOURNAL_SIZE_LIMIT = 8 * 1024 * 1024

#: Serialises opening with ``os.fork`` (see :mod:`klime.spool._spool`): a fork never
#: happens while this process holds ``open.lock``.
opening = threading.Lock()


def _v1(conn: sqlite3.Connection) -> None:
    conn.execute(
        "CREATE TABLE owners ("
        " id INTEGER PRIMARY KEY AUTOINCREMENT,"  # what rows refer to (small: fast inserts)
        " token TEXT NOT NULL UNIQUE,"  # names the lock file owners/<token>.lock
        " pid INTEGER NOT NULL,"
        " start_ticks INTEGER,"
        " boot_id TEXT,"
        " pid_ns TEXT,"
        " host TEXT NOT NULL,"
        " opened REAL NOT NULL)"
    )
    conn.execute(
        "CREATE TABLE events ("
        " id INTEGER PRIMARY KEY AUTOINCREMENT,"  # never reused: a Claimed names rows by id
        " owner INTEGER NOT NULL,"  # owners.id (no foreign key: an adopter moves rows first)
        " created REAL NOT NULL,"  # unix time of the append
        " due REAL NOT NULL,"  # unix time of the next attempt
        " attempts INTEGER NOT NULL DEFAULT 0,"
        " claimed INTEGER NOT NULL DEFAULT 0,"
        " size INTEGER NOT NULL,"
        " body BLOB NOT NULL)"
    )
    conn.execute("CREATE INDEX events_claimable ON events (owner, claimed, due)")
    conn.execute(
        "CREATE TABLE totals ("
        " id INTEGER PRIMARY KEY CHECK (id = 1),"
        " count INTEGER NOT NULL,"
        " bytes INTEGER NOT NULL,"
        " dropped_count INTEGER NOT NULL,"
        " dropped_bytes INTEGER NOT NULL)"
    )
    conn.execute("INSERT INTO totals VALUES (1, 0, 0, 0, 0)")


def _v2(conn: sqlite3.Connection) -> None:
    # the project (endpoint + write key fingerprint) of each owner: only an owner of the same
    # project adopts its rows; NULL for owners registered by an older klime (see adopt)
    conn.execute("ALTER TABLE owners ADD COLUMN project TEXT")
    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")


#: Migration ``i`` brings a database from version ``i`` to ``i + 1``; append, never edit.
MIGRATIONS: Tuple[Callable[[sqlite3.Connection], None], ...] = (_v1, _v2)
SCHEMA_VERSION = len(MIGRATIONS)

# --------------------------------------------------------------------------- errors

_REASONS = {
    5: "locked",
    6: "locked",
    13: "full",
    11: "corrupt",
    26: "corrupt",
    8: "unwritable",
    3: "unwritable",
}
_REASONS.update({14: "unwritable", 10: "io", 23: "unwritable"})
_TEXTS = (
    ("locked", "locked"),
    ("busy", "locked"),
    ("disk is full", "full"),
    ("malformed", "corrupt"),
    ("not a database", "corrupt"),
    ("readonly", "unwritable"),
    ("read-only", "unwritable"),
    ("unable to open", "unwritable"),
    ("disk i/o", "io"),
)
_ERRNOS = {errno.ENOSPC: "full", errno.EDQUOT: "full", errno.EACCES: "unwritable", errno.EPERM: "unwritable"}
_ERRNOS.update({errno.EROFS: "unwritable", errno.ENOTDIR: "unwritable", errno.EEXIST: "unwritable"})
_EXPLAINED = {
    "locked": "the database is locked by another process (longer than the busy timeout)",
    "full": "no space left for the spool",
    "corrupt": "the database file is corrupt",
    "unwritable": "the spool cannot be written here",
    "io": "an I/O error",
}


def classify(exc: BaseException) -> str:
    """The ``reason`` of :class:`SpoolUnavailable` for an sqlite3 or OS error."""
    if isinstance(exc, SpoolUnavailable):
        return exc.reason
    if isinstance(exc, OSError):
        return _ERRNOS.get(exc.errno or 0, "io")
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
    if isinstance(code, int) and (code & 0xFF) in _REASONS:
        return _REASONS[code & 0xFF]
    text = str(exc).lower()
    for needle, reason in _TEXTS:
        if needle in text:
            return reason
    return "error"


def unavailable(
    exc: BaseException, directory: str, action: str, *, recovered: bool = False
) -> SpoolUnavailable:
    if isinstance(exc, SpoolUnavailable):
        return exc
    reason = classify(exc)
    what = _EXPLAINED.get(reason, "an error")
    message = f"klime spool {directory}: {action} failed, {what} ({type(exc).__name__}: {exc})"
    if recovered:
        message += "; it was moved aside and a fresh spool started"
    return SpoolUnavailable(message, reason, directory, recovered=recovered)


@contextmanager
def begin(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction (``BEGIN IMMEDIATE``: the write lock up front, so it never
    deadlocks upgrading a read). Rolls back on any exception."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
        raise
    conn.execute("COMMIT")


# --------------------------------------------------------------------------- opening


class Database:
    """An open connection and the identity of the file it opened."""

    __slots__ = ("conn", "path", "dev", "ino", "moved_aside")

    def __init__(self, conn: sqlite3.Connection, path: str, moved_aside: Optional[str]) -> None:
        self.conn = conn
        self.path = path
        st = os.stat(path)
        self.dev = st.st_dev
        self.ino = st.st_ino
        self.moved_aside = moved_aside

    def replaced(self) -> bool:
        """True when the path no longer names the file this connection has open (moved aside
        by a sibling after corruption, or deleted). One ``stat``; never raises."""
        try:
            st = os.stat(self.path)
        except OSError:
            return True
        return (st.st_dev, st.st_ino) != (self.dev, self.ino)


def _connect(path: str, busy_timeout: float, synchronous: str, *, create: bool) -> sqlite3.Connection:
    if create:
        target, uri = path, False
    else:
        target, uri = "file:" + path.replace("?", "%3f").replace("#", "%23") + "?mode=rw", True
    conn = sqlite3.connect(
        target,
        timeout=busy_timeout,
        isolation_level=None,  # autocommit; transactions are explicit (BEGIN IMMEDIATE)
        check_same_thread=False,  # used from several threads, one at a time (the Spool's lock)
        cached_statements=256,
        uri=uri,
    )
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        conn.execute(f"PRAGMA synchronous = {synchronous}")
        conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}")
    except BaseException:
        conn.close()
        raise
    return conn


def _prepare(conn: sqlite3.Connection, directory: str) -> None:
    """WAL mode and the current schema, migrating an older one. Raises sqlite3 errors."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]  # reads the header: fails on garbage
    app_id = conn.execute("PRAGMA application_id").fetchone()[0]
    if app_id not in (0, APPLICATION_ID) or (app_id == 0 and not _klime_shape(conn, version)):
        raise _foreign(directory)
    if version == 0:
        # must precede the first table; only a new, empty database can change it
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        # in the file's header before WAL mode: `klime spool` recognises the file by it
        conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        log.warning_once(
            "spool-no-wal:" + directory,
            "klime: the spool %s could not use WAL mode (got %s); it works, but more slowly",
            directory,
            mode,
        )
    if version > SCHEMA_VERSION:
        raise SpoolUnavailable(
            f"klime spool {directory}: written by a newer klime (schema {version}, this one knows "
            f"{SCHEMA_VERSION}); not touching it",
            "version",
            directory,
        )
    if version == SCHEMA_VERSION:
        return
    with begin(conn):
        version = conn.execute("PRAGMA user_version").fetchone()[0]  # again, under the lock
        for migrate in MIGRATIONS[version:]:
            migrate(conn)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def _foreign(directory: str) -> SpoolUnavailable:
    return SpoolUnavailable(
        f"klime spool {directory}: {DB_NAME} there is not a klime spool database (another "
        "program's file, or corrupt); not touching it",
        "foreign",
        directory,
    )


def _klime_shape(conn: sqlite3.Connection, version: int) -> bool:
    """Without the marker: an empty database (version 0), or one with klime's tables."""
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    tables.discard("sqlite_sequence")
    if version == 0:
        return not tables
    if not set(_LEGACY_SHAPE) <= tables:
        return False
    for table, needed in _LEGACY_SHAPE.items():
        columns = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        if not needed <= columns:
            return False
    return True


def recognise(directory: str) -> str:
    """What ``<directory>/spool.sqlite3`` is, creating and changing nothing: ``"none"`` (no
    file, or an empty one), ``"klime"`` (marked as klime's spool), ``"legacy"`` (klime's
    tables, written before the marker), ``"corrupt"`` (not an SQLite file) or ``"foreign"``
    (an SQLite database of another program, or not a regular file). Blocks for one read of
    the header and, without the marker, a read of the schema (an SQLite file without
    tables, e.g. a spool being created, is ``"none"``). Never raises for a file it
    can read; raises OSError for one it cannot."""
    path = os.path.join(directory, DB_NAME)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "none"
    if not stat.S_ISREG(st.st_mode):
        return "foreign"
    if st.st_size == 0:
        return "none"
    fd = os.open(path, os.O_RDONLY | _safety.OPEN_FLAGS)
    try:
        header = os.read(fd, 100)
    finally:
        os.close(fd)
    if len(header) < 100 or not header.startswith(_SQLITE_MAGIC):
        return "corrupt"
    app_id = int.from_bytes(header[68:72], "big")
    if app_id == APPLICATION_ID:
        return "klime"
    if app_id != 0:
        return "foreign"
    quoted = path.replace("?", "%3f").replace("#", "%23")
    wal = os.path.exists(path + "-wal")
    # immutable: no lock, no -shm, no -wal created; with a live WAL its content is read too
    uri = "file:" + quoted + ("?mode=ro" if wal else "?mode=ro&immutable=1")
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=DEFAULT_BUSY_TIMEOUT_S)
    except sqlite3.Error:
        return "corrupt"
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if not _klime_shape(conn, version):
            return "foreign"
        return "legacy" if version else "none"  # none: empty (a spool being created)
    except sqlite3.Error as exc:
        return "corrupt" if classify(exc) == "corrupt" else "foreign"
    finally:
        conn.close()


def _stamp() -> str:
    now = time.time()
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + "%06dZ" % int((now % 1) * 1e6)


def move_aside(path: str) -> str:
    """Rename a damaged database (and its ``-wal``/``-shm``) to ``<name>.corrupt-<UTC time>``;
    return the new name. Raises OSError."""
    target = f"{path}.corrupt-{_stamp()}"
    os.rename(path, target)
    for suffix in ("-wal", "-shm"):
        try:
            os.rename(path + suffix, target + suffix)
        except FileNotFoundError:
            pass
    return target


@contextmanager
def _directory_lock(directory: str, timeout: float) -> Iterator[None]:
    """Hold ``open.lock`` (flock) for the block; wait up to ``timeout`` seconds for it."""
    assert _owners.fcntl is not None
    fd = os.open(os.path.join(directory, OPEN_LOCK), os.O_RDWR | os.O_CREAT | _safety.OPEN_FLAGS, 0o600)
    _owners.hold_transient(fd)
    try:
        deadline = time.monotonic() + timeout
        delay = 0.001
        while True:  # bounded by the deadline
            try:
                _owners.fcntl.flock(fd, _owners.fcntl.LOCK_EX | _owners.fcntl.LOCK_NB)
                break
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise SpoolUnavailable(
                        f"klime spool {directory}: another process kept it locked while opening "
                        f"for more than {timeout:g} s",
                        "locked",
                        directory,
                    ) from None
                time.sleep(min(delay, left))
                delay = min(delay * 2, 0.05)
        yield
    finally:
        _owners.release_transient(fd)


def make_directory(directory: str) -> str:
    """Create the spool directory (mode 0o700) and its ``owners/``, checking each is private
    (:mod:`._safety`) before anything is created inside it; return the absolute path.
    Raises OSError, SpoolUnavailable (``"unsafe"``, or ``"unwritable"`` for a path that is
    not a directory)."""
    directory = os.path.abspath(os.fspath(directory))
    for path in (directory, os.path.join(directory, _owners.OWNERS_DIR)):
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        else:
            os.chmod(path, 0o700)  # whatever the umask
        _safety.check_dir(directory, path)
    return directory


def open_database(
    directory: str,
    *,
    busy_timeout: float,
    synchronous: str,
    expected: Optional[Tuple[int, int]] = None,
    setup: Optional[Callable[[sqlite3.Connection], None]] = None,
) -> Database:
    """Open (creating, migrating, or replacing a corrupt file) ``<directory>/spool.sqlite3``.

    ``expected``: the (dev, inode) of a file the caller found corrupt; it is moved aside only
    if the path still names that file (a sibling may have done it already). ``setup`` runs
    on the new connection before it is returned (a corrupt file found there is replaced too). Blocks up to
    ``busy_timeout`` for ``open.lock``, plus the SQLite work. Raises SpoolUnavailable.
    """
    path = os.path.join(directory, DB_NAME)
    moved: List[str] = []
    with opening, _directory_lock(directory, busy_timeout):
        if expected is not None:
            try:
                st = os.stat(path)
                if (st.st_dev, st.st_ino) == expected:
                    moved.append(move_aside(path))
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise unavailable(exc, directory, "moving the corrupt database aside") from exc
        for attempt in (1, 2):
            conn: Optional[sqlite3.Connection] = None
            try:
                # 0600 whatever the umask: SQLite gives -wal and -shm the database's mode
                _safety.create_private(path)
                conn = _connect(path, busy_timeout, synchronous, create=True)
                _prepare(conn, directory)
                if setup is not None:
                    setup(conn)
                db = Database(conn, path, moved[0] if moved else None)
            except (sqlite3.Error, OSError, SpoolUnavailable) as exc:
                if conn is not None:
                    conn.close()
                if attempt == 1 and classify(exc) == "corrupt":
                    try:
                        moved.append(move_aside(path))
                    except OSError as move_exc:
                        raise unavailable(move_exc, directory, "moving the corrupt database aside") from exc
                    continue
                raise unavailable(exc, directory, "opening the database") from exc
            break
    if moved:
        log.warning(
            "klime: the spool database in %s was corrupt and was moved aside to %s (its events "
            "are not sent); a fresh spool was started",
            directory,
            moved[-1],
        )
    return db


def connect_existing(
    directory: str, *, busy_timeout: float = DEFAULT_BUSY_TIMEOUT_S
) -> Optional[sqlite3.Connection]:
    """A connection to an existing spool for inspecting or clearing it, or None when there
    is no spool database there (creates nothing, migrates nothing). The directory must be
    private (:func:`._safety.check_directory`, without fixing anything) and the database
    klime's. Raises SpoolUnavailable (``"unsafe"``, ``"foreign"``, ``"corrupt"``,
    ``"version"``, ...)."""
    directory = os.path.abspath(os.fspath(directory))
    _safety.check_directory(directory, fix=False)
    path = os.path.join(directory, DB_NAME)
    try:
        kind = recognise(directory)
    except OSError as exc:
        raise unavailable(exc, directory, "reading the database") from exc
    if kind == "none":
        return None
    if kind == "foreign":
        raise _foreign(directory)
    if kind == "corrupt":
        raise SpoolUnavailable(
            f"klime spool {directory}: {DB_NAME} is corrupt (not an SQLite database)", "corrupt", directory
        )
    try:
        conn = _connect(path, busy_timeout, "NORMAL", create=False)
    except sqlite3.Error as exc:
        raise unavailable(exc, directory, "opening the database") from exc
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
    except sqlite3.Error as exc:
        conn.close()
        raise unavailable(exc, directory, "reading the database") from exc
    if not 1 <= version <= SCHEMA_VERSION:
        conn.close()
        if version == 0:
            return None  # created but never set up
        raise SpoolUnavailable(
            f"klime spool {directory}: schema {version}, this klime knows {SCHEMA_VERSION}",
            "version",
            directory,
        )
    return conn


def has_projects(conn: sqlite3.Connection) -> bool:
    """True when the owners table records projects (schema 2 and later)."""
    return any(row[1] == "project" for row in conn.execute("PRAGMA table_info(owners)"))

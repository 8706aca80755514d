"""Who owns spooled rows, and whether that process is still alive.

Every open :class:`~klime.spool.Spool` is an *owner*: a random token, recorded in the
database's ``owners`` table, and a lock file ``owners/<token>.lock`` on which the owning
process holds ``fcntl.flock(LOCK_EX)`` for as long as it lives. The kernel drops a flock when
the last descriptor of its open file goes away, so the lock dies with the process however
it ends (SIGKILL, OOM killer, ``os._exit``, a deploy). An adopter opens the file anew and
tries ``LOCK_EX | LOCK_NB``: success means no live process holds it.

Why a lock and not pid + start time: liveness never depends on a pid, so pid reuse cannot
fool it, and it works across pid namespaces (containers sharing a volume) and on macOS,
where ``/proc`` does not exist. flock locks belong to the open file, not the process, so an
inherited descriptor shares the lock; forked children therefore close their copy at once
(:func:`after_fork_in_child`, and the Spool's own pid check) without ``LOCK_UN``, which
would release the parent's lock. The pid, process start time, boot id and pid namespace are
recorded too, but only for display and for one abnormal case: a lock file that has gone
missing (deleted by hand), where they are used conservatively (unsure means alive).

Requires a local file system (as SQLite's WAL mode does): flock over NFS is emulated.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Iterator, Optional, Set, Tuple

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "OWNERS_DIR",
    "Identity",
    "OwnerLock",
    "Held",
    "probe",
    "is_alive",
    "sweep",
    "hold_transient",
    "release_transient",
    "available",
    "fcntl",
]

OWNERS_DIR = "owners"
#: Open flags for lock files: close on exec, and never through a symlink planted there.
_NOFOLLOW = os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
_SUFFIX = ".lock"
_TMP_PREFIX = "."
_TMP_SUFFIX = ".tmp"
#: A half-made lock file (a crash between create and rename) is removed after this long.
_STALE_TMP_S = 60.0

#: Descriptors that hold a flock only for the length of one operation (an adopter's lock on
#: a dead owner's file, the open lock). A forked child closes its copies at once so that
#: it never keeps such a lock alive after the parent let go of it.
_transient: Set[int] = set()
_transient_lock = threading.Lock()


def available() -> bool:
    """True where ``fcntl.flock`` exists (Linux, macOS, the BSDs)."""
    return fcntl is not None


def hold_transient(fd: int) -> None:
    with _transient_lock:
        _transient.add(fd)


def release_transient(fd: int) -> None:
    with _transient_lock:
        _transient.discard(fd)
    try:
        os.close(fd)
    except OSError:
        pass


def after_fork_in_child() -> None:
    global _transient_lock
    _transient_lock = threading.Lock()
    for fd in list(_transient):
        try:
            os.close(fd)  # this copy only: the parent's lock stays held until it closes its own
        except OSError:
            pass
    _transient.clear()


os.register_at_fork(after_in_child=after_fork_in_child)


def _read(path: str) -> Optional[str]:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read().strip() or None
    except OSError:
        return None


def process_start(pid: int) -> Optional[int]:
    """The start time of process ``pid`` in clock ticks since boot (Linux), else None."""
    text = _read(f"/proc/{pid}/stat")
    if text is None:
        return None
    try:  # the command name (field 2) may hold spaces and parentheses: split after the last ")"
        return int(text.rsplit(")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


@dataclass(frozen=True)
class Identity:
    """Where and which process an owner was: for display, and for a missing lock file."""

    pid: int
    start: Optional[int]
    boot: Optional[str]
    pidns: Optional[str]
    host: str

    @classmethod
    def current(cls) -> Identity:
        pid = os.getpid()
        try:
            pidns: Optional[str] = os.readlink("/proc/self/ns/pid")
        except OSError:
            pidns = None
        return cls(
            pid, process_start(pid), _read("/proc/sys/kernel/random/boot_id"), pidns, socket.gethostname()
        )


def _maybe_running(owner: Identity) -> bool:
    """Conservative: True unless the process is certainly gone."""
    here = Identity.current()
    if owner.host != here.host:
        return True  # another machine or container: this process cannot tell
    if owner.boot and here.boot and owner.boot != here.boot:
        return False  # same host, rebooted since
    if owner.pidns != here.pidns:
        return True
    if owner.start is not None:
        return process_start(owner.pid) == owner.start
    try:
        os.kill(owner.pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def lock_path(owners_dir: str, token: str) -> str:
    return os.path.join(owners_dir, token + _SUFFIX)


def _flock_nb(fd: int) -> bool:
    assert fcntl is not None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _inode(fd: int) -> Optional[Tuple[int, int]]:
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


class OwnerLock:
    """This process's lock file as owner ``token``. Not thread-safe (the Spool guards it)."""

    __slots__ = ("token", "path", "fd", "_inode")

    def __init__(self, token: str, path: str, fd: Optional[int]) -> None:
        self.token = token
        self.path = path
        self.fd = fd
        self._inode = None if fd is None else _inode(fd)

    @classmethod
    def create(cls, owners_dir: str) -> OwnerLock:
        """Make and lock ``owners/<token>.lock``. The file appears under its final name
        already locked (made under a temporary name, then renamed), so an adopter never sees
        it unlocked. Raises OSError. Blocks only on the file system."""
        token = uuid.uuid4().hex
        tmp = os.path.join(owners_dir, _TMP_PREFIX + token + _TMP_SUFFIX)
        final = lock_path(owners_dir, token)
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o600)
        try:
            if not _flock_nb(fd):  # a brand-new file: nobody else can hold it
                raise OSError(errno.EWOULDBLOCK, "could not lock a new owner file", tmp)
            os.write(fd, f"{os.getpid()}\n".encode("ascii"))
            os.rename(tmp, final)
        except BaseException:
            os.close(fd)
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        return cls(token, final, fd)

    def forget(self) -> None:
        """In a forked child: close the inherited descriptor WITHOUT unlocking (``LOCK_UN``
        on a shared open file would release the parent's lock). After a fork that ran no
        hook, code in the child may have closed and reused that number: it is closed only
        if it still is the lock file."""
        fd, self.fd = self.fd, None
        if fd is not None and _inode(fd) == self._inode:
            try:
                os.close(fd)
            except OSError:
                pass

    def release(self, *, unlink: bool) -> None:
        """Let go of the lock (the owner is done); remove the file when it has no rows left."""
        if unlink:
            try:
                os.unlink(self.path)
            except OSError:
                pass
        self.forget()


class Held:
    """A dead owner's lock, held by an adopter while it moves that owner's rows."""

    __slots__ = ("token", "path", "fd")

    def __init__(self, token: str, path: str, fd: Optional[int]) -> None:
        self.token = token
        self.path = path
        self.fd = fd

    def finish(self, *, unlink: bool = True) -> None:
        if unlink:
            try:
                os.unlink(self.path)
            except OSError:
                pass
        if self.fd is not None:
            release_transient(self.fd)
            self.fd = None


def probe(owners_dir: str, token: str, recorded: Optional[Identity]) -> Optional[Held]:
    """None when owner ``token`` is (or may be) alive; else its lock, held by the caller
    until :meth:`Held.finish`. Non-blocking (``LOCK_NB``). Never raises."""
    path = lock_path(owners_dir, token)
    try:
        fd = os.open(path, os.O_RDWR | _NOFOLLOW)
    except FileNotFoundError:
        # Only an abnormal spool lacks the file of a registered owner. Decide on the recorded
        # process, conservatively; without a record (rows of an unregistered owner) it is gone.
        if recorded is not None and _maybe_running(recorded):
            return None
        return Held(token, path, None)
    except OSError:
        return None
    hold_transient(fd)
    try:
        locked = _flock_nb(fd)
    except OSError:
        locked = False
    if not locked:
        release_transient(fd)
        return None
    return Held(token, path, fd)


def is_alive(owners_dir: str, token: str, recorded: Optional[Identity]) -> bool:
    """Probe without keeping anything. Non-blocking; never raises."""
    held = probe(owners_dir, token, recorded)
    if held is None:
        return True
    held.finish(unlink=False)
    return False


def _entries(owners_dir: str) -> Iterator[os.DirEntry[str]]:
    try:
        with os.scandir(owners_dir) as it:
            yield from it
    except OSError:
        return


def sweep(owners_dir: str, registered: Set[str]) -> int:
    """Remove lock files nobody holds and no registered owner needs: left by an adopter that
    died between its commit and its unlink, or by a crash while a lock file was being made.
    Returns how many were removed. Non-blocking; never raises."""
    removed = 0
    now = time.time()
    for entry in _entries(owners_dir):
        name = entry.name
        if name.endswith(_SUFFIX) and not name.startswith(_TMP_PREFIX):
            if name[: -len(_SUFFIX)] in registered:
                continue
        elif name.startswith(_TMP_PREFIX) and name.endswith(_TMP_SUFFIX):
            try:
                if now - entry.stat().st_mtime < _STALE_TMP_S:
                    continue
            except OSError:
                continue
        else:
            continue
        try:
            fd = os.open(entry.path, os.O_RDWR | _NOFOLLOW)
        except OSError:
            continue
        hold_transient(fd)
        try:
            if _flock_nb(fd):
                os.unlink(entry.path)
                removed += 1
        except OSError:
            pass
        finally:
            release_transient(fd)
    return removed

"""Fork hooks for open spools.

Before ``os.fork`` every open spool's lock (and the opening lock) is taken, with a bounded
wait, so that no SQLite operation is in the middle of a transaction when the child is made:
the child's copy of SQLite's in-process lock bookkeeping then matches the (no) locks it
really holds. In the child each spool forgets its connection and owner lock
(:meth:`Spool._forked`); the parent carries on. Forks that run no Python hook (uWSGI) are
caught by the pid check on every spool call instead.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import weakref
from typing import Any, List

from . import _store

__all__ = ["track", "untrack", "abandon", "guard"]

#: Connections a forked child inherited. Never used and never closed: closing one would
#: release POSIX locks SQLite holds for this process on the same file through another
#: connection.
_abandoned: List[sqlite3.Connection] = []
_spools: weakref.WeakSet[Any] = weakref.WeakSet()
_guard = threading.Lock()
_held: List[threading.Lock] = []
#: How long a fork waits for an operation in progress, beyond the spool's busy timeout.
_MARGIN_S = 1.0


def track(spool: Any) -> None:
    _spools.add(spool)


def untrack(spool: Any) -> None:
    _spools.discard(spool)


def abandon(conn: sqlite3.Connection) -> None:
    _abandoned.append(conn)


def guard() -> threading.Lock:
    """Serialises a spool's switch to a new identity in a child (pid check racing threads)."""
    return _guard


def _before() -> None:
    held: List[threading.Lock] = []
    timeout = _store.DEFAULT_BUSY_TIMEOUT_S
    for spool in list(_spools):
        lock: threading.Lock = spool._lock
        timeout = max(timeout, spool._busy_timeout)
        if lock.acquire(timeout=spool._busy_timeout + _MARGIN_S):
            held.append(lock)
    if _store.opening.acquire(timeout=timeout + _MARGIN_S):
        held.append(_store.opening)
    _held[:] = held


def _after_in_parent() -> None:
    held = list(_held)
    _held.clear()
    for lock in reversed(held):
        lock.release()


def _after_in_child() -> None:
    global _guard
    _guard = threading.Lock()
    _held.clear()
    _store.opening = threading.Lock()
    for spool in list(_spools):
        spool._forked()


os.register_at_fork(before=_before, after_in_parent=_after_in_parent, after_in_child=_after_in_child)

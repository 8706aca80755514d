"""klime's logger: ``logging.getLogger("klime")`` unless ``klime.configure(logger=...)``.

Every module logs through :data:`log`, which forwards to the configured logger and
swallows anything the logger raises: a broken log handler must never break delivery.
Messages use %-style arguments and never contain the write key.

Warnings that mean events may be lost (a full queue, retries exhausted, a permanent
rejection, uWSGI without threads, ...) go through :meth:`_Log.notice`: one WARNING record
per *episode* (from the first loss until :meth:`_Log.end_episode`, e.g. the next
successful request), and, when nothing in the process is set up to receive klime's
records, the same line on stderr. Python's last-resort handler would do that for every
record; klime's ``NullHandler`` switches it off (as the logging HOWTO asks of libraries), so
klime writes that one line itself — never for an app that configured logging, which gets
the record instead and no duplicate line.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Any, Dict, Optional, Set

__all__ = ["log", "set_logger", "NULL_HANDLER", "logging_configured", "STDERR_REPEAT_S"]

#: The same episode's line goes to stderr at most once in this many seconds.
STDERR_REPEAT_S = 60.0

#: The handler ``import klime`` adds to the ``klime`` logger; it does not count as the
#: application's logging set-up.
NULL_HANDLER = logging.NullHandler()
_KLIME = logging.getLogger("klime")


def logging_configured(target: Any) -> bool:
    """Would a record sent to ``target`` at WARNING reach someone?

    True for any logger object the application gave klime (``klime.configure(logger=)``),
    and for the ``klime`` logger when it, or an ancestor it propagates to, has a handler
    other than klime's own NullHandler; also True when the application switched WARNING off
    for klime (its choice, not an accident). Non-blocking; reads logging's state without
    its lock (a stale answer costs at most one line on stderr).
    """
    if target is not _KLIME:
        return True
    if not _KLIME.isEnabledFor(logging.WARNING):
        return True
    current: Any = _KLIME
    while current is not None:
        for handler in current.handlers:
            if handler is not NULL_HANDLER:
                return True
        if not current.propagate:
            return False
        current = current.parent
    return False


def _stderr_line(text: str) -> None:
    stream = sys.stderr
    if stream is None:  # pythonw, some daemons
        return
    try:
        stream.write(text + "\n")
        stream.flush()
    except Exception:
        pass


class _Log:
    def __init__(self) -> None:
        self.target: Any = _KLIME
        self._once: Set[str] = set()
        self._episodes: Set[str] = set()
        self._said_at: Dict[str, float] = {}  # when each episode's line last went to stderr
        self._once_lock = threading.Lock()

    def _emit(self, level: str, msg: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        try:
            getattr(self.target, level)(msg, *args, **kwargs)
        except Exception:
            pass

    def debug(self, msg: str, *args: Any, **kwargs: Any) -> None:
        self._emit("debug", msg, args, kwargs)

    def info(self, msg: str, *args: Any, **kwargs: Any) -> None:
        self._emit("info", msg, args, kwargs)

    def warning(self, msg: str, *args: Any, **kwargs: Any) -> None:
        self._emit("warning", msg, args, kwargs)

    def error(self, msg: str, *args: Any, **kwargs: Any) -> None:
        self._emit("error", msg, args, kwargs)

    def exception(self, msg: str, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("exc_info", True)
        self._emit("error", msg, args, kwargs)

    # -------------------------------------------------------------- once / per episode

    def _first(self, key: str, seen: Set[str]) -> bool:
        with self._once_lock:
            if key in seen:
                return False
            seen.add(key)
            return True

    def _say(self, msg: str, args: tuple[Any, ...], key: Optional[str] = None) -> None:
        """One WARNING record; and the line on stderr when nobody receives the record (for
        an episode ``key``, at most once per :data:`STDERR_REPEAT_S`: a flapping episode
        does not fill a terminal)."""
        self._emit("warning", msg, args, {})
        try:
            if logging_configured(self.target):
                return
            if key is not None:
                now = time.monotonic()
                with self._once_lock:
                    last = self._said_at.get(key)
                    if last is not None and now - last < STDERR_REPEAT_S:
                        return
                    self._said_at[key] = now
            text = msg % args if args else msg
        except Exception:
            return
        _stderr_line(text)

    def warning_once(self, key: str, msg: str, *args: Any) -> None:
        """Warn the first time ``key`` is seen in this process (stderr too when no logging
        is configured). Thread-safe, non-blocking but for the log handlers."""
        if self._first(key, self._once):
            self._say(msg, args)

    def reset_once(self, key: str) -> None:
        with self._once_lock:
            self._once.discard(key)

    def notice(self, key: str, msg: str, *args: Any) -> bool:
        """Warn that events may be lost, once per episode of ``key``: a WARNING record, and
        the same line on stderr when nothing is set up to receive klime's records. Returns
        True when this call started the episode. Thread-safe."""
        if not self._first(key, self._episodes):
            return False
        self._say(msg, args, key)
        return True

    def end_episode(self, key: str) -> bool:
        """End the episode of ``key``: its next :meth:`notice` is said again. Returns True
        when an episode was open. Thread-safe; cheap when none is."""
        if key not in self._episodes:  # unlocked read: the common, nothing-to-do case
            return False
        with self._once_lock:
            if key not in self._episodes:
                return False
            self._episodes.discard(key)
            return True


log = _Log()


def _after_fork_in_child() -> None:
    # the lock may have been held by another thread of the parent at the fork; a child's
    # losses are its own episodes
    log._once_lock = threading.Lock()
    log._episodes = set()
    log._said_at = {}


os.register_at_fork(after_in_child=_after_fork_in_child)


def set_logger(logger: Any) -> None:
    """Send klime's log records to ``logger`` (any object with logging's methods)."""
    log.target = logger if logger is not None else _KLIME

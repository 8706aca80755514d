"""klime's logger: ``logging.getLogger("klime")`` unless ``klime.configure(logger=...)``.

Every module logs through :data:`log`, which forwards to the configured logger and
swallows anything the logger raises: a broken log handler must never break delivery.
Messages use %-style arguments and never contain the write key.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Set

__all__ = ["log", "set_logger"]


class _Log:
    def __init__(self) -> None:
        self.target: Any = logging.getLogger("klime")
        self._once: Set[str] = set()
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

    def warning_once(self, key: str, msg: str, *args: Any) -> None:
        """Log a warning the first time ``key`` is seen in this process."""
        with self._once_lock:
            if key in self._once:
                return
            self._once.add(key)
        self.warning(msg, *args)

    def reset_once(self, key: str) -> None:
        with self._once_lock:
            self._once.discard(key)


log = _Log()


def _after_fork_in_child() -> None:
    # the lock may have been held by another thread of the parent at the fork
    log._once_lock = threading.Lock()


import os as _os  # noqa: E402

_os.register_at_fork(after_in_child=_after_fork_in_child)


def set_logger(logger: Any) -> None:
    """Send klime's log records to ``logger`` (any object with logging's methods)."""
    log.target = logger if logger is not None else logging.getLogger("klime")

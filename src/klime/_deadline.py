"""One deadline for a blocking call, shared by everything under it.

A :class:`Deadline` is handed from ``flush``/``shutdown``/``*_sync`` down through the
transport and the sender's retries, so HTTP timeouts, backoff sleeps and waits all stop at
the same instant. Another thread may :meth:`~Deadline.tighten` it (a ``shutdown`` cutting a
worker's backoff sleep short); sleepers wake at once.
"""

from __future__ import annotations

import math
import numbers
import threading
import time
from typing import Optional

from .errors import ValidationError

__all__ = ["Deadline", "check_timeout"]

_monotonic = time.monotonic


def check_timeout(timeout: object) -> float | None:
    """A blocking call's ``timeout`` in seconds, normalised: None or infinity → None (no
    limit), a negative number → 0 (do not wait). Anything else is a ValidationError."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise ValidationError(f"timeout must be a number of seconds or None, not {type(timeout).__name__}")
    value = float(timeout)
    if math.isnan(value):
        raise ValidationError("timeout must be a number of seconds or None, not NaN")
    if math.isinf(value):
        return None if value > 0 else 0.0
    return max(0.0, value)


class Deadline:
    """A point in time (``time.monotonic()``), or none. Thread-safe."""

    __slots__ = ("_at", "_cond")

    def __init__(self, at: float | None = None) -> None:
        self._at = at
        self._cond = threading.Condition(threading.Lock())

    @classmethod
    def after(cls, timeout: float | None) -> Deadline:
        """A deadline ``timeout`` seconds from now; ``None`` (or infinity) means never.

        Raises ValidationError for a timeout that is not a number, or NaN."""
        timeout = check_timeout(timeout)
        if timeout is None:
            return cls(None)
        return cls(_monotonic() + timeout)

    @property
    def at(self) -> Optional[float]:
        return self._at

    def remaining(self) -> float | None:
        """Seconds left (never negative), or None when there is no deadline."""
        at = self._at
        if at is None:
            return None
        return max(0.0, at - _monotonic())

    def expired(self) -> bool:
        at = self._at
        return at is not None and _monotonic() >= at

    def cap(self, seconds: float) -> float:
        """``seconds``, or less if the deadline comes sooner."""
        left = self.remaining()
        return seconds if left is None else min(seconds, left)

    def tighten(self, at: float | None) -> None:
        """Move the deadline earlier (never later) and wake anyone sleeping on it."""
        if at is None:
            return
        with self._cond:
            if self._at is None or at < self._at:
                self._at = at
            self._cond.notify_all()

    def sleep(self, seconds: float) -> bool:
        """Block for ``seconds`` or until the deadline, whichever is first.

        Returns True when the whole sleep happened, False when the deadline cut it short.
        """
        end = _monotonic() + max(0.0, seconds)
        with self._cond:
            while True:
                now = _monotonic()
                at = self._at
                if at is not None and at <= end:
                    if now >= at:
                        return False
                    self._cond.wait(at - now)
                    continue
                if now >= end:
                    return True
                self._cond.wait(end - now)

    def __repr__(self) -> str:
        left = self.remaining()
        return "Deadline(never)" if left is None else f"Deadline(in {left:.3f}s)"

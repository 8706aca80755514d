"""One deadline for a blocking call, shared by everything under it.

A :class:`Deadline` is handed from ``flush``/``shutdown``/``*_sync`` down through the
transport and the sender's retries, so HTTP timeouts, backoff sleeps and waits all stop at
the same instant. Another thread may :meth:`~Deadline.tighten` it (a ``shutdown`` cutting a
worker's backoff sleep short); sleepers wake at once.

"Forever" is spelled in many ways (None, infinity, ``1e10``): any timeout longer than
:data:`MAX_TIMEOUT_S` means no limit, and no wait here ever asks ``threading`` for more than
``threading.TIMEOUT_MAX`` seconds at once (beyond it, ``threading`` raises OverflowError).
"""

from __future__ import annotations

import math
import numbers
import threading
import time
from typing import Optional

from .errors import ValidationError

__all__ = ["Deadline", "MAX_TIMEOUT_S", "check_timeout", "seconds_or_no_limit"]

_monotonic = time.monotonic

#: A timeout longer than this (a year) means "no limit": nobody waits a year on purpose, and
#: a year is far below what ``threading`` can wait for, on every platform.
MAX_TIMEOUT_S = min(365 * 24 * 3600.0, threading.TIMEOUT_MAX)
#: The longest single wait handed to ``threading``; longer waits are done in turns.
_MAX_WAIT_S = threading.TIMEOUT_MAX


def seconds_or_no_limit(seconds: float) -> float | None:
    """``seconds`` (a number, not NaN, already checked), or None (no limit) when it is
    infinite or longer than :data:`MAX_TIMEOUT_S`. Never below 0. Pure; thread-safe."""
    if seconds > MAX_TIMEOUT_S:
        return None
    return max(0.0, seconds)


def check_timeout(timeout: object) -> float | None:
    """A blocking call's ``timeout`` in seconds, normalised: None, infinity or anything
    longer than :data:`MAX_TIMEOUT_S` → None (no limit), a negative number → 0 (do not
    wait). Anything else (not a real number, NaN) is a ValidationError. Thread-safe."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise ValidationError(f"timeout must be a number of seconds or None, not {type(timeout).__name__}")
    try:
        value = float(timeout)
    except (OverflowError, ValueError, TypeError):  # an int too large for a float, an odd Real
        if isinstance(timeout, int):  # 10**400 seconds: no limit; -10**400: do not wait
            return None if timeout > 0 else 0.0
        raise ValidationError(
            f"timeout must be a number of seconds or None, not {type(timeout).__name__}"
        ) from None
    if math.isnan(value):
        raise ValidationError("timeout must be a number of seconds or None, not NaN")
    return seconds_or_no_limit(value)


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
        """Seconds left (never negative, never above ``threading.TIMEOUT_MAX``, so it can be
        handed to any ``wait``/``join``), or None when there is no deadline."""
        at = self._at
        if at is None:
            return None
        return min(_MAX_WAIT_S, max(0.0, at - _monotonic()))

    def expired(self) -> bool:
        at = self._at
        return at is not None and _monotonic() >= at

    def cap(self, seconds: float) -> float:
        """``seconds``, or less if the deadline comes sooner (and never above
        ``threading.TIMEOUT_MAX``)."""
        left = self.remaining()
        return min(seconds, _MAX_WAIT_S) if left is None else min(seconds, left)

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
        Any ``seconds`` works: infinity (or a huge number) sleeps until the deadline (or
        for ever without one); NaN or a negative number does not sleep. Thread-safe.
        """
        end = _monotonic() + (seconds if seconds > 0 else 0.0)  # NaN > 0 is False
        with self._cond:
            while True:
                now = _monotonic()
                at = self._at
                if at is not None and at <= end:
                    if now >= at:
                        return False
                    self._cond.wait(min(at - now, _MAX_WAIT_S))
                    continue
                if now >= end:
                    return True
                self._cond.wait(min(end - now, _MAX_WAIT_S))

    def __repr__(self) -> str:
        left = self.remaining()
        return "Deadline(never)" if left is None else f"Deadline(in {left:.3f}s)"

"""The retry policy shared by klime's senders.

Which statuses are transient, the exponential backoff between attempts, and the server's
``Retry-After`` (seconds or an HTTP date, capped) — all plain Python, so the policy behaves
the same on every urllib3 (1.26 to the newest) and costs no import of an HTTP stack. The
senders drive the attempts themselves, one by one, so that a caller's deadline can cut
them short and each attempt is counted.
"""

from __future__ import annotations

import random
import re
import time
from typing import Optional

from .._config import MAX_RETRY_AFTER_S, MAX_RETRY_DELAY_S

__all__ = ["RetryPolicy", "TRANSIENT_STATUSES", "parse_retry_after"]

#: Statuses worth another attempt: request timeout, rate limit and server errors.
TRANSIENT_STATUSES = frozenset({408, 429, *range(500, 600)})

_SECONDS = re.compile(r"\s*([0-9]{1,12})\s*")


def parse_retry_after(header: Optional[str], cap: float, *, now: Optional[float] = None) -> Optional[float]:
    """Seconds to wait for a ``Retry-After`` value: a number of seconds or an HTTP date
    (RFC 9110 10.2.3), never negative, at most ``cap``; None if absent or unreadable.
    Pure; thread-safe."""
    if not header or not isinstance(header, str):
        return None
    match = _SECONDS.fullmatch(header)
    if match is not None:
        seconds = float(match.group(1))
    else:
        from email.utils import mktime_tz, parsedate_tz  # an HTTP date: rare, loaded when seen

        try:
            parsed = parsedate_tz(header)
            if parsed is None:
                return None
            seconds = mktime_tz(parsed) - (time.time() if now is None else now)
        except (ValueError, OverflowError, TypeError):
            return None
    return min(max(0.0, seconds), max(0.0, cap))


class RetryPolicy:
    """Exponential backoff from ``initial_delay`` (seconds), doubling, each delay capped.

    ``max_attempts`` counts every attempt, the first included. ``jitter`` takes up to that
    fraction off each delay, so a fleet of clients does not retry in lockstep. A server's
    ``Retry-After`` is honoured up to ``retry_after_max`` seconds. Immutable and
    thread-safe.
    """

    def __init__(
        self,
        max_attempts: int,
        initial_delay: float,
        *,
        max_delay: float = MAX_RETRY_DELAY_S,
        retry_after_max: float = MAX_RETRY_AFTER_S,
        jitter: float = 0.2,
    ) -> None:
        self.max_attempts = max(1, int(max_attempts))
        self.initial_delay = max(0.0, float(initial_delay))
        self.max_delay = float(max_delay)
        self.retry_after_max = max(0.0, float(retry_after_max))
        self.jitter = min(max(0.0, float(jitter)), 1.0)

    @staticmethod
    def is_transient_status(status: int) -> bool:
        """True for the statuses another attempt may fix (408, 429, 5xx)."""
        return status in TRANSIENT_STATUSES

    def backoff(self, failed_attempts: int) -> float:
        """Seconds to wait after ``failed_attempts`` (1, 2, ...) consecutive failures."""
        delay: float = min(self.max_delay, self.initial_delay * 2.0 ** max(0, failed_attempts - 1))
        if self.jitter:
            delay *= 1.0 - self.jitter * random.random()
        return delay

    def retry_after(self, header: Optional[str]) -> Optional[float]:
        """The server's ``Retry-After`` in seconds (capped), or None if absent or unreadable."""
        return parse_retry_after(header, self.retry_after_max)

    def __repr__(self) -> str:
        return (
            f"RetryPolicy(max_attempts={self.max_attempts}, initial_delay={self.initial_delay}, "
            f"max_delay={self.max_delay})"
        )

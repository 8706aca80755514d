"""The retry policy shared by klime's senders.

urllib3's :class:`~urllib3.util.retry.Retry` supplies what it already does well — which
statuses are transient, and ``Retry-After`` parsing (seconds or an HTTP date, capped) — while
klime drives the attempts itself, one by one, so that a caller's deadline can cut them short
and each attempt is counted.
"""

from __future__ import annotations

import random
from typing import Optional

from urllib3.exceptions import InvalidHeader
from urllib3.util.retry import Retry

from .._config import MAX_RETRY_AFTER_S, MAX_RETRY_DELAY_S

__all__ = ["RetryPolicy", "TRANSIENT_STATUSES"]

#: Statuses worth another attempt: request timeout, rate limit and server errors.
TRANSIENT_STATUSES = frozenset({408, 429, *range(500, 600)})


class RetryPolicy:
    """Exponential backoff from ``initial_delay`` (seconds), doubling, each delay capped.

    ``max_attempts`` counts every attempt, the first included. ``jitter`` takes up to that
    fraction off each delay, so a fleet of clients does not retry in lockstep. Immutable
    and thread-safe.
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
        self.jitter = min(max(0.0, float(jitter)), 1.0)
        self._urllib3 = Retry(
            total=self.max_attempts - 1,
            allowed_methods=None,  # every method, POST included: each event carries a messageId
            status_forcelist=TRANSIENT_STATUSES,
            respect_retry_after_header=True,
            retry_after_max=int(retry_after_max),
        )

    def is_transient_status(self, status: int) -> bool:
        return bool(self._urllib3.is_retry("POST", status, has_retry_after=False))

    def backoff(self, failed_attempts: int) -> float:
        """Seconds to wait after ``failed_attempts`` (1, 2, ...) consecutive failures."""
        delay: float = min(self.max_delay, self.initial_delay * 2.0 ** max(0, failed_attempts - 1))
        if self.jitter:
            delay *= 1.0 - self.jitter * random.random()
        return delay

    def retry_after(self, header: Optional[str]) -> Optional[float]:
        """The server's ``Retry-After`` in seconds (capped), or None if absent or unreadable."""
        if not header:
            return None
        try:
            return float(self._urllib3.parse_retry_after(header))
        except (InvalidHeader, ValueError, OverflowError):
            return None

    def __repr__(self) -> str:
        return (
            f"RetryPolicy(max_attempts={self.max_attempts}, initial_delay={self.initial_delay}, "
            f"max_delay={self.max_delay})"
        )

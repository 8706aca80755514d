"""Retrying: the one backoff formula, the retry policy, and the retry value a batch carries.

Every wait between attempts in klime comes from :func:`backoff_delay` (exponential from an
initial delay, doubling, capped): the HTTP sender's retries, the SQS sender's, the spool's
release of a batch whose retries ran out, and the invocation transport's pause after an
inline send failed. :class:`RetryPolicy` holds a sender's limits (attempts, first delay,
cap, jitter, how long a server's ``Retry-After`` is honoured); :class:`Retry` is the frozen
record one batch carries from attempt to attempt (attempts made, the server's last
``Retry-After``, whether the one at-once retry after a stale connection was used), in the
manner of urllib3's ``Retry``. All plain Python: no HTTP stack is imported.

Layer 0 (model). May import: the standard library and :mod:`klime._config`.
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass
from typing import Optional

from ._config import MAX_RETRY_AFTER_S, MAX_RETRY_DELAY_S

__all__ = ["FIRST_TRY", "Retry", "RetryPolicy", "TRANSIENT_STATUSES", "backoff_delay", "parse_retry_after"]

#: Statuses worth another attempt: request timeout, rate limit and server errors.
TRANSIENT_STATUSES = frozenset({408, 429, *range(500, 600)})

_SECONDS = re.compile(r"\s*([0-9]{1,12})\s*")

#: Doubling stops here (2 ** 60 times any delay is past every cap).
_MAX_DOUBLINGS = 60


def backoff_delay(failures: int, initial: float, maximum: float) -> float:
    """Seconds to wait after ``failures`` (1, 2, ...) consecutive failures:
    ``min(maximum, initial * 2 ** (failures - 1))``, never negative. The one backoff formula
    of klime. Pure; thread-safe."""
    doublings = min(max(0, failures - 1), _MAX_DOUBLINGS)
    return max(0.0, min(maximum, initial * 2.0**doublings))


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


@dataclass(frozen=True)
class Retry:
    """Where one batch stands in its retries. Immutable: each attempt makes a new value.

    ``attempts``: requests made for the batch so far (earlier, deferred sends included).
    ``retry_after``: the server's ``Retry-After`` on the last attempt, seconds (None: none).
    ``stale_retry_used``: the one retry at once after a stale pooled connection was used
    (that retry is not a sign of load and is not counted as a backoff step).
    """

    attempts: int = 0
    retry_after: Optional[float] = None
    stale_retry_used: bool = False

    def attempted(self, *, retry_after: Optional[float] = None, stale: bool = False) -> Retry:
        """The value after one more attempt (``stale``: it failed on a stale connection)."""
        return Retry(self.attempts + 1, retry_after, self.stale_retry_used or stale)

    @property
    def backoff_steps(self) -> int:
        """Failures that count toward the backoff (the at-once stale retry does not)."""
        return self.attempts - (1 if self.stale_retry_used else 0)


#: A batch that has had no attempt yet.
FIRST_TRY = Retry()


class RetryPolicy:
    """A sender's retry limits: exponential backoff (:func:`backoff_delay`) from
    ``initial_delay`` seconds, each delay capped at ``max_delay``.

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
        delay = backoff_delay(failed_attempts, self.initial_delay, self.max_delay)
        if self.jitter:
            delay *= 1.0 - self.jitter * random.random()
        return delay

    def wait(self, retry: Retry) -> float:
        """Seconds to wait before the next attempt of a batch at ``retry``: the server's
        ``Retry-After`` if it gave one, else the backoff."""
        if retry.retry_after is not None:
            return retry.retry_after
        return self.backoff(retry.backoff_steps)

    def exhausted(self, retry: Retry) -> bool:
        """Has a batch at ``retry`` had all its attempts?"""
        return retry.attempts >= self.max_attempts

    def retry_after(self, header: Optional[str]) -> Optional[float]:
        """The server's ``Retry-After`` in seconds (capped), or None if absent or unreadable."""
        return parse_retry_after(header, self.retry_after_max)

    def __repr__(self) -> str:
        return (
            f"RetryPolicy(max_attempts={self.max_attempts}, initial_delay={self.initial_delay}, "
            f"max_delay={self.max_delay})"
        )

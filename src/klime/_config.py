"""Defaults, hard limits and environment look-ups shared by every part of klime.

Option names and units follow Klime's Ruby SDK (milliseconds for intervals and delays);
blocking calls take ``timeout`` in seconds, as :mod:`threading` does.
"""

from __future__ import annotations

import os

DEFAULT_ENDPOINT = "https://i.klime.com"
BATCH_PATH = "/v1/batch"

DEFAULT_FLUSH_INTERVAL_MS = 2000
DEFAULT_MAX_BATCH_SIZE = 20
DEFAULT_MAX_QUEUE_SIZE = 1000
DEFAULT_RETRY_MAX_ATTEMPTS = 5
DEFAULT_RETRY_INITIAL_DELAY_MS = 1000
DEFAULT_EXIT_TIMEOUT_S = 2.0
#: Floors of the interval options, milliseconds: below them an idle client spins and a
#: failing endpoint gets a storm of requests (a smaller value is raised, with a warning).
MIN_FLUSH_INTERVAL_MS = 10.0
MIN_RETRY_INITIAL_DELAY_MS = 10.0
#: ``shutdown()`` without a timeout gives up after this many seconds.
DEFAULT_SHUTDOWN_TIMEOUT_S = 5.0
#: Requests in flight at once at most (under a backlog, with slow round trips; one at a
#: time otherwise). Also the size of the HTTP sender's keep-alive connection pool.
DEFAULT_MAX_CONCURRENT_REQUESTS = 32
#: The durable spool's byte cap (all processes together), and the least accepted (above
#: the largest event, so that an event always fits).
DEFAULT_SPOOL_MAX_BYTES = 100 * 1024 * 1024
MIN_SPOOL_BYTES = 1024 * 1024
#: Largest value accepted for max_concurrent_requests.
MAX_CONCURRENT_REQUESTS = 128

#: Each backoff delay is capped at this many seconds.
MAX_RETRY_DELAY_S = 16.0
#: A server's Retry-After is honoured up to this many seconds.
MAX_RETRY_AFTER_S = 60.0

#: Server limits (DESIGN.md section 3).
MAX_BATCH_EVENTS = 100
MAX_EVENT_BYTES = 204_800
#: Properties/traits nested deeper than this many dicts/lists are a ValidationError, on
#: every Python (the C JSON encoder's own limit changed in 3.12).
MAX_DEPTH = 500
MAX_REQUEST_BYTES = 10 * 1024 * 1024

#: HTTP socket timeouts, seconds.
DEFAULT_CONNECT_TIMEOUT_S = 5.0
DEFAULT_READ_TIMEOUT_S = 10.0

ENV_WRITE_KEY = "KLIME_WRITE_KEY"
ENV_ENDPOINT = "KLIME_ENDPOINT"


def env(name: str) -> str | None:
    """Return the environment variable ``name``, or None when unset or empty."""
    value = os.environ.get(name)
    return value or None

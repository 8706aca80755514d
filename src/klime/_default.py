"""The optional default client behind ``klime.track()`` and friends: klime's one global.

``klime.client`` (get and set) reads and writes it; integrations and tools that act on "the
default client" ask here, never the ``klime`` package (which sits above them). It is created
on first use from ``KLIME_WRITE_KEY`` / ``KLIME_ENDPOINT`` by :func:`get_or_create`.

May import: the face (``_client``) and below.
"""

from __future__ import annotations

import os
import threading
from typing import Optional

from ._client import Client

__all__ = ["current", "replace", "get_or_create"]

_client: Optional[Client] = None
_lock = threading.Lock()


def current() -> Optional[Client]:
    """The default client, or None if none was set or made yet. Non-blocking."""
    return _client


def replace(client: Optional[Client]) -> Optional[Client]:
    """Make ``client`` the default client (None: forget it); returns the previous one.
    Thread-safe, non-blocking. The previous client is not shut down."""
    global _client
    if client is not None and not isinstance(client, Client):
        raise TypeError(f"klime.client must be a klime.Client or None, not {type(client).__name__}")
    with _lock:
        previous, _client = _client, client
    return previous


def get_or_create() -> Client:
    """The default client, created from the environment on first use (then reused).
    Thread-safe; creating it does no I/O (raises ConfigurationError without a write key)."""
    global _client
    found = _client
    if found is None:
        with _lock:
            found = _client
            if found is None:
                found = _client = Client()
    return found


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.Lock()  # another thread may have held it at the fork


os.register_at_fork(after_in_child=_after_fork_in_child)

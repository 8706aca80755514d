"""The durable spool: events on disk, shared by every process of an app (opt-in).

A :class:`Spool` is one SQLite database (WAL mode) in a directory. Every process that opens
it is an *owner*: it appends its events as rows, claims batches of its own rows to send,
and settles each batch (:meth:`~Spool.ack` sent, :meth:`~Spool.release` try again later,
:meth:`~Spool.reject` failed for good). Rows of a process that died are taken over by a live
one (:meth:`~Spool.adopt`). Events are opaque ``bytes`` (encoded JSON) here.

::

    spool = Spool.open("/var/lib/myapp/klime", max_bytes=100 * 1024 * 1024)
    spool.adopt()                                   # rows of processes that are gone
    spool.append([event_bytes, ...])                # -> AppendResult (what the cap dropped)
    batch = spool.claim(100, 10 * 1024 * 1024)      # -> Claimed (maybe empty)
    result = sender.send(batch.events, deadline)
    spool.ack(batch)                                # or release(batch, retry_at=...) / reject(batch)

Every storage failure raises :class:`~klime.errors.SpoolUnavailable`. See docs/spool.md.
"""

from __future__ import annotations

from ..errors import SpoolUnavailable
from ._admin import clear, inspect
from ._models import AppendResult, Claimed, OwnerStats, SpoolStats
from ._spool import DEFAULT_BUSY_TIMEOUT_S, DEFAULT_MAX_BYTES, Spool, retry_time
from ._store import DB_NAME, SCHEMA_VERSION

__all__ = [
    "Spool",
    "Claimed",
    "AppendResult",
    "SpoolStats",
    "OwnerStats",
    "SpoolUnavailable",
    "inspect",
    "clear",
    "retry_time",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_BUSY_TIMEOUT_S",
    "DB_NAME",
    "SCHEMA_VERSION",
]

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

Every storage failure raises :class:`~klime.errors.SpoolUnavailable`. A spool is private
and single-project: a directory another user could plant files in is refused (``"unsafe"``),
files are created 0600, and rows are adopted only by an owner of the same project
(:func:`project_id`: a fingerprint of the endpoint and write key). See docs/spool.md.
"""

from __future__ import annotations

from ..errors import SpoolUnavailable
from ._admin import clear, inspect
from ._models import AdoptResult, AppendResult, Claimed, OwnerStats, SpoolStats
from ._safety import project_id, valid_event
from ._spool import DEFAULT_MAX_BYTES, Spool, retry_time

__all__ = [
    "Spool",
    "Claimed",
    "AppendResult",
    "AdoptResult",
    "project_id",
    "valid_event",
    "SpoolStats",
    "OwnerStats",
    "SpoolUnavailable",
    "inspect",
    "clear",
    "retry_time",
    "DEFAULT_MAX_BYTES",
]

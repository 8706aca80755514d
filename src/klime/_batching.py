"""Splitting encoded events into request-sized batches: one pure function.

Events are the encoded JSON bytes of :mod:`klime._events`. A request body is
``{"batch":[e1,e2,...]}``, so its size is known exactly without encoding anything again.
"""

from __future__ import annotations

from typing import List, Sequence

__all__ = ["BODY_OVERHEAD", "body_size", "batch_body", "split_batches"]

_OPEN = b'{"batch":['
_CLOSE = b"]}"
#: Bytes of a request body that are not events (and not the commas between them).
BODY_OVERHEAD = len(_OPEN) + len(_CLOSE)


def body_size(events: Sequence[bytes]) -> int:
    """The exact size in bytes of :func:`batch_body` of ``events``."""
    return BODY_OVERHEAD + sum(map(len, events)) + max(0, len(events) - 1)


def batch_body(events: Sequence[bytes]) -> bytes:
    """The request body for ``events`` (already encoded): ``{"batch":[...]}``."""
    return _OPEN + b",".join(events) + _CLOSE


def split_batches(events: Sequence[bytes], max_count: int, max_bytes: int) -> List[List[bytes]]:
    """Split ``events`` into consecutive batches, keeping order.

    Every event appears in exactly one batch; no batch has more than ``max_count`` events or
    a body (:func:`batch_body`) larger than ``max_bytes``; a batch ends only where adding the
    next event would break one of those limits. An event too large to fit any body on its
    own is put alone in a batch of its own: the caller decides what to do with it.
    """
    if max_count < 1:
        raise ValueError("max_count must be at least 1")
    count = len(events)
    if 0 < count <= max_count and BODY_OVERHEAD + sum(map(len, events)) + count - 1 <= max_bytes:
        return [list(events)]  # the usual case: the whole batch fits (one pass in C)
    batches: List[List[bytes]] = []
    current: List[bytes] = []
    size = BODY_OVERHEAD
    for event in events:
        n = len(event)
        if current and (len(current) >= max_count or size + 1 + n > max_bytes):
            batches.append(current)
            current = []
            size = BODY_OVERHEAD
        size += n + (1 if current else 0)
        current.append(event)
    if current:
        batches.append(current)
    return batches

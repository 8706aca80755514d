"""The memory transport: keeps events in a list, sends nothing. For tests."""

from __future__ import annotations

import threading
from typing import Any, Dict, List, Optional, Sequence

from .._events import decode
from .._models import BatchResponse, FlushResult
from .base import SyncTransport

__all__ = ["MemoryTransport"]


class MemoryTransport(SyncTransport):
    """Records every event instead of sending it; each counts as sent at once.

    ``events`` holds the wire dicts (camelCase, exactly what would have been sent).
    Thread-safe; nothing blocks.
    """

    name = "memory"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._raw: List[bytes] = []
        self._accepted = 0
        self._closed = False

    def submit(self, event: bytes) -> bool:
        with self._lock:
            if self._closed:
                return False
            self._raw.append(event)
            self._accepted += 1
        self.delivery.acknowledge(1)
        return True

    @property
    def events(self) -> List[Dict[str, Any]]:
        """A copy of the recorded events, oldest first, as wire dicts."""
        with self._lock:
            raw = list(self._raw)
        return [decode(e) for e in raw]

    @property
    def raw(self) -> List[bytes]:
        """A copy of the recorded events as the exact JSON bytes that would be sent."""
        with self._lock:
            return list(self._raw)

    def send(self, events: Sequence[bytes], timeout: Optional[float] = None) -> Optional[BatchResponse]:
        """The ``*_sync`` path: record ``events`` and answer as a server accepting them all.

        Returns None (nothing recorded) when the transport was shut down.
        """
        for event in events:
            if not self.submit(event):
                return None
        return BatchResponse("ok", len(events))

    def sync_transport(self) -> MemoryTransport:
        return self

    def clear(self) -> None:
        with self._lock:
            self._raw.clear()

    def flush(self, timeout: Optional[float] = None) -> FlushResult:
        return FlushResult()

    def shutdown(self, timeout: Optional[float] = None, *, flush: bool = True) -> FlushResult:
        with self._lock:
            self._closed = True
        return FlushResult()

    def counts(self) -> Dict[str, int]:
        with self._lock:
            return {"accepted": self._accepted, "pending": 0}

    def after_fork(self) -> None:
        self._lock = threading.Lock()

"""The blocking transport: send on the caller's thread, now."""

from __future__ import annotations

import threading
from typing import Any, Callable, Dict, List, Optional, Sequence

from .._deadline import Deadline
from .._models import BatchResponse, FlushResult
from .base import SyncTransport

__all__ = ["BlockingTransport"]


class BlockingTransport(SyncTransport):
    """Sends each event as it comes, on the calling thread, with the full retry policy.

    ``submit`` blocks until the event is delivered or reported to ``on_error``; ``send``
    (behind ``track_sync`` and friends) blocks too and raises :class:`~klime.SendError`
    instead. Nothing is ever queued, so ``flush`` has nothing to do. Thread-safe.
    Good for scripts, CLIs and tests; a web request should not wait on the network.
    """

    name = "blocking"
    #: it sends on the caller's thread: the HTTP library is loaded there, at the first send
    prepare_sender_early = False

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._accepted = 0
        self._inflight = 0
        self._closed = False

    def _begin(self, count: int) -> bool:
        with self._lock:
            if self._closed:
                return False
            self._accepted += count
            self._inflight += count
            return True

    def _settler(self, count: int) -> Callable[..., bool]:
        """Ends the in-flight count once: when Delivery settles the events (before any
        callback runs, so stats() inside a callback adds up) or, failing that, after."""
        done: List[bool] = []

        def settle(_outcome: Any = None) -> bool:
            if not done:
                done.append(True)
                with self._lock:
                    self._inflight -= count
            return True

        return settle

    def submit(self, event: bytes) -> bool:
        if not self._begin(1):
            return False
        settle = self._settler(1)
        try:
            self.delivery.send([event], Deadline(), settle=settle)
        finally:
            settle()
        return True

    def send(self, events: Sequence[bytes], timeout: Optional[float] = None) -> Optional[BatchResponse]:
        """Deliver ``events`` now; return the server's response, raise SendError on failure.

        Returns None (sending nothing) when the transport was shut down.
        """
        deadline = Deadline.after(timeout)
        if not self._begin(len(events)):
            return None
        settle = self._settler(len(events))
        try:
            return self.delivery.send_sync(events, deadline, settle=settle)
        finally:
            settle()

    def flush(self, timeout: Optional[float] = None) -> FlushResult:
        return FlushResult()

    def shutdown(self, timeout: Optional[float] = None, *, flush: bool = True) -> FlushResult:
        with self._lock:
            self._closed = True
        return FlushResult()

    def counts(self) -> Dict[str, int]:
        with self._lock:
            return {"accepted": self._accepted, "pending": self._inflight}

    def after_fork(self) -> None:
        self._lock = threading.Lock()
        self._accepted = 0
        self._inflight = 0

"""The invocation transport: buffer during a serverless invocation, send before it ends.

AWS Lambda and Cloud Functions freeze the process the moment a handler returns, so a
background thread cannot be trusted to send anything. This transport runs no thread:
events wait in a buffer until ``flush`` (called by :func:`klime.klime_lambda` /
:func:`klime.klime_cloud_function` before the handler returns) sends them, several batches
at once when there are many. One keep-alive session is reused across warm invocations.

Without the decorator events still go out: a full batch is sent on the caller's thread, and
events left over from an earlier invocation (older than ``flush_interval``) are sent with
the next event, with one warning naming the decorator.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional

from .._config import DEFAULT_FLUSH_INTERVAL_MS, DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_QUEUE_SIZE
from .._deadline import Deadline
from .._logging import log
from .._models import FlushResult
from .base import Transport

__all__ = ["InvocationTransport"]

_monotonic = time.monotonic


class InvocationTransport(Transport):
    """Buffer events; send them on ``flush`` (or inline when a batch fills).

    Args:
        flush_interval: milliseconds after which a buffered event counts as left over
            from an earlier invocation (see the module docstring).
        max_batch_size: events per request; a full batch is sent inline on ``submit``.
        max_queue_size: buffered events at most; beyond it the oldest are dropped and
            reported (only reachable when sends keep failing).
        concurrency: batches sent at once by ``flush``.

    Thread-safe. ``submit`` blocks only when it sends a full batch inline.
    """

    name = "invocation"

    def __init__(
        self,
        *,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL_MS,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE,
        concurrency: int = 4,
    ) -> None:
        self.flush_interval = float(flush_interval) / 1000.0
        self.max_batch_size = max(1, min(100, int(max_batch_size)))
        self.max_queue_size = max(1, int(max_queue_size))
        self.concurrency = max(1, int(concurrency))
        self.managed = False
        self._reset()

    def _reset(self) -> None:
        closed = getattr(self, "_closed", False)
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._buffer: List[bytes] = []
        self._oldest = 0.0
        self._accepted = 0
        self._inflight = 0
        self._closed = closed

    def after_fork(self) -> None:
        self._reset()

    def begin_invocation(self) -> None:
        """Called by the serverless decorators as an invocation starts."""
        self.managed = True

    # ------------------------------------------------------------------ submit

    def submit(self, event: bytes) -> bool:
        now = _monotonic()
        with self._lock:
            if self._closed:
                return False
            buffer = self._buffer
            stale = bool(buffer) and now - self._oldest > self.flush_interval
            if not buffer:
                self._oldest = now
            overflow: List[bytes] = []
            if len(buffer) >= self.max_queue_size:
                overflow = [buffer.pop(0)]
            buffer.append(event)
            self._accepted += 1
            full = len(buffer) >= self.max_batch_size
        if overflow:
            self.delivery.drop(overflow, f"buffer full (max_queue_size={self.max_queue_size}); event dropped")
        if stale and not self.managed:
            log.warning_once(
                "invocation-leftovers",
                "klime: events from an earlier invocation were still waiting; they are sent "
                "now. Decorate the handler with @klime_lambda (or @klime_cloud_function) so "
                "each invocation's events are sent before it returns",
            )
        if full or (stale and not self.managed):
            self._send(Deadline(), full_only=not stale)
        return True

    # ------------------------------------------------------------------ sending

    def _take(self, full_only: bool) -> List[List[bytes]]:
        size = self.max_batch_size
        with self._lock:
            buffer = self._buffer
            n = len(buffer) - (len(buffer) % size if full_only else 0)
            if n <= 0:
                return []
            taken, self._buffer = buffer[:n], buffer[n:]
            self._oldest = _monotonic()
            self._inflight += n
        return [taken[i : i + size] for i in range(0, n, size)]

    def _send(self, deadline: Deadline, *, full_only: bool = False) -> None:
        with self._send_lock:
            batches = self._take(full_only)
            if not batches:
                return
            kept: List[bytes] = []
            try:
                if len(batches) == 1 or self.concurrency == 1:
                    outcomes = [self._send_one(b, deadline) for b in batches]
                else:
                    with ThreadPoolExecutor(
                        max_workers=min(self.concurrency, len(batches)), thread_name_prefix="klime-flush"
                    ) as pool:
                        outcomes = list(pool.map(lambda b: self._send_one(b, deadline), batches))
                for unsent in outcomes:
                    kept.extend(unsent)
            finally:
                with self._lock:
                    self._inflight -= sum(map(len, batches))
                    if kept:  # not sent in time: first in line for the next flush
                        self._buffer[0:0] = kept
                        self._oldest = _monotonic()

    def _send_one(self, batch: List[bytes], deadline: Deadline) -> List[bytes]:
        if deadline.expired():
            return batch
        return self.delivery.send(batch, deadline, keep_unsent=True).unsent or []

    def flush(self, timeout: Optional[float] = None) -> FlushResult:
        """Send everything buffered, within ``timeout`` seconds. Blocks; thread-safe.

        Events that could not be sent in time (the deadline passed before their batch
        started) stay buffered for the next flush and are reported as ``unsent``.
        """
        deadline = Deadline.after(timeout)
        before = self.delivery.counters()
        self._send(deadline)
        after = self.delivery.counters()
        with self._lock:
            unsent = len(self._buffer) + self._inflight
        return FlushResult(
            sent=after["sent"] - before["sent"],
            failed=after["failed"] - before["failed"],
            dropped=after["dropped"] - before["dropped"],
            unsent=unsent,
            timed_out=unsent > 0 and deadline.expired(),
        )

    def shutdown(self, timeout: Optional[float] = None, *, flush: bool = True) -> FlushResult:
        with self._lock:
            if self._closed:
                return FlushResult()
            self._closed = True
        before = self.delivery.counters()
        if flush:
            self.flush(timeout)
        with self._lock:
            leftovers, self._buffer = self._buffer, []
        if leftovers:
            self.delivery.drop(
                leftovers,
                "shutdown deadline reached before the event was sent"
                if flush
                else "client shut down with flush_on_shutdown=False; event not sent",
            )
        after = self.delivery.counters()
        return FlushResult(
            sent=after["sent"] - before["sent"],
            failed=after["failed"] - before["failed"],
            dropped=after["dropped"] - before["dropped"],
        )

    def counts(self) -> Dict[str, int]:
        with self._lock:
            return {"accepted": self._accepted, "pending": len(self._buffer) + self._inflight}

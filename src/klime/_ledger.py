"""The ledger: the one place that counts what became of events, and builds ``FlushResult``.

Every transport of a client delivers through one :class:`~klime._delivery.Delivery`, which
owns one :class:`Ledger`: events sent (accepted by the destination), failed (reported to
``on_error`` after a server's failure or refusal), dropped (never sent: a full queue, a
shutdown), and the requests and retries made. ``flush()`` and ``shutdown()`` take a
:class:`Tally` before they start and build their :class:`~klime._models.FlushResult` with
:meth:`Ledger.result_since`: no transport subtracts counters itself. ``Client.stats()`` is
built by :meth:`Ledger.stats`, from these counts and what the client's transports hold.

Events dropped for room are counted on the caller's thread, under the transport's own lock
(:meth:`Ledger.dropped_for_room_locked`): no second lock on that path.

Layer 2 (delivery). May import: the model (``_models``).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Dict, Mapping, Optional

from ._models import FlushResult

__all__ = ["Ledger", "Tally"]


@dataclass(frozen=True)
class Tally:
    """The ledger's counts at one instant."""

    sent: int = 0
    failed: int = 0
    dropped: int = 0
    retries: int = 0
    requests: int = 0

    def as_dict(self) -> Dict[str, int]:
        return {
            "sent": self.sent,
            "failed": self.failed,
            "dropped": self.dropped,
            "retries": self.retries,
            "requests": self.requests,
        }


class Ledger:
    """Counts of the conservation law (see the module docstring). Thread-safe."""

    __slots__ = ("_lock", "_sent", "_failed", "_dropped", "_retries", "_requests", "_dropped_for_room")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sent = self._failed = self._dropped = self._retries = self._requests = 0
        #: dropped for room on a caller's thread; guarded by that transport's lock
        self._dropped_for_room = 0

    def count(
        self, *, sent: int = 0, failed: int = 0, dropped: int = 0, retries: int = 0, requests: int = 0
    ) -> None:
        """Add to the counts. Non-blocking (one short lock); thread-safe."""
        with self._lock:
            self._sent += sent
            self._failed += failed
            self._dropped += dropped
            self._retries += retries
            self._requests += requests

    def dropped_for_room_locked(self) -> None:
        """One event was dropped for room: count it. The caller holds its transport's lock
        (the only writer of this count); microseconds, no other lock."""
        self._dropped_for_room += 1

    def tally(self) -> Tally:
        """The counts now. Non-blocking; thread-safe."""
        with self._lock:
            return Tally(
                self._sent,
                self._failed,
                self._dropped + self._dropped_for_room,
                self._retries,
                self._requests,
            )

    def result_since(
        self, before: Tally, *, unsent: int = 0, timed_out: Optional[bool] = None, expired: bool = False
    ) -> FlushResult:
        """What was resolved since ``before`` (a :meth:`tally` taken when a flush or a
        shutdown began), with ``unsent`` events still waiting. ``timed_out``: as given, or
        (None) ``unsent > 0 and expired``. The one builder of a FlushResult with counts."""
        after = self.tally()
        return FlushResult(
            sent=after.sent - before.sent,
            failed=after.failed - before.failed,
            dropped=after.dropped - before.dropped,
            unsent=unsent,
            timed_out=(unsent > 0 and expired) if timed_out is None else timed_out,
        )

    def stats(self, own: Mapping[str, int], *others: Mapping[str, int]) -> Dict[str, int]:
        """The counters of ``Client.stats()``: this ledger's counts, with what the client's
        transports say they hold (their ``counts()``, taken just before: ``accepted``,
        ``pending`` and, the client's own transport ``own`` only, ``dropped``, ``spooled``,
        ``adopted``); ``others``: its other transports (the one of ``*_sync`` calls).
        ``tracked + adopted == sent + failed + dropped + queued`` whenever nothing moves.
        Non-blocking; thread-safe."""
        books = self.tally()
        return {
            "tracked": own["accepted"] + sum(counts["accepted"] for counts in others),
            "sent": books.sent,
            "failed": books.failed,
            "dropped": books.dropped + own.get("dropped", 0),
            "queued": own["pending"] + sum(counts["pending"] for counts in others),
            "spooled": own.get("spooled", 0),
            "adopted": own.get("adopted", 0),
            "retries": books.retries,
            "requests": books.requests,
        }

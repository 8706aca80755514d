"""The ledger: the one place that counts what became of events, and builds ``FlushResult``.

Every transport of a client delivers through one :class:`~klime._delivery.Delivery`, which
owns one :class:`Ledger`: events sent (accepted by the destination), failed (reported to
``on_error`` after a server's failure or refusal), dropped (never sent: a full queue, a
shutdown), and the requests and retries made. ``flush()`` and ``shutdown()`` take a
:class:`Tally` before they start and build their :class:`~klime._models.FlushResult` with
:meth:`Ledger.result_since`: no transport subtracts counters itself. ``Client.stats()`` is
:meth:`Ledger.stats`: these counts, and what the transports that deliver through this
ledger hold (its :class:`Holder` s, registered when a transport is attached): events
tracked, queued, spooled and adopted. Those the ledger reads rather than counts again, so
that ``track()`` does no more work than it did: a transport's tracked count is the
sequence number its queue keeps anyway.

Events dropped for room are counted on the caller's thread, under the transport's own lock
(:meth:`Ledger.dropped_for_room_locked`): no second lock on that path.

Layer 2 (delivery). May import: the model (``_models``).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Dict, List, Optional, Protocol, Sequence

from ._models import FlushResult

__all__ = ["Holder", "Ledger", "Tally"]


class Holder(Protocol):
    """What a transport holds, as the ledger reads it (``Transport.counts``)."""

    def counts(self) -> Dict[str, int]:
        """``accepted``: events taken by ``submit`` (tracked); ``pending``: not yet resolved
        (queued); optionally ``spooled`` (this process's events on disk, part of pending),
        ``adopted`` (taken over from processes that are gone) and ``dropped`` (dropped and
        counted by the transport itself). Non-blocking; thread-safe."""
        ...


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

    __slots__ = (
        "_lock", "_sent", "_failed", "_dropped", "_retries", "_requests", "_dropped_for_room", "_holders"
    )

    def __init__(self, holders: Sequence[Holder] = ()) -> None:
        self._lock = threading.Lock()
        #: the transports delivering through this ledger (see :meth:`hold`)
        self._holders: List[Holder] = list(holders)
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

    def hold(self, holder: Holder) -> None:
        """Read ``holder``'s counts in :meth:`stats` from now on (once, however often it is
        registered). Called when a transport is attached, before its first event."""
        if not any(known is holder for known in self._holders):
            self._holders = [*self._holders, holder]  # a new list: stats() reads it unlocked

    def fresh(self) -> Ledger:
        """A ledger with no counts and the same holders (a forked child's)."""
        return Ledger(self._holders)

    def stats(self) -> Dict[str, int]:
        """The counters of ``Client.stats()``: this ledger's counts, with what its holders
        say they hold (read just before): ``tracked`` (accepted), ``queued`` (pending),
        ``spooled``, ``adopted``, and what they dropped themselves.
        ``tracked + adopted == sent + failed + dropped + queued`` whenever nothing moves.
        Non-blocking; thread-safe."""
        held = [holder.counts() for holder in self._holders]
        books = self.tally()

        def total(key: str) -> int:
            return sum(counts.get(key, 0) for counts in held)

        return {
            "tracked": total("accepted"),
            "sent": books.sent,
            "failed": books.failed,
            "dropped": books.dropped + total("dropped"),
            "queued": total("pending"),
            "spooled": total("spooled"),
            "adopted": total("adopted"),
            "retries": books.retries,
            "requests": books.requests,
        }

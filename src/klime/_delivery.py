"""Delivery: hands batches to the sender and keeps the books.

Every transport delivers through one :class:`Delivery`, so splitting to the sender's limits,
the 413 split-and-retry, the counters of the conservation law and the ``on_success`` /
``on_error`` callbacks live in exactly one place. Thread-safe.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

from ._batching import split_batches
from ._deadline import Deadline
from ._events import decode_all
from ._logging import log as logger
from ._models import BatchResponse, EventError
from ._settings import defaults
from .errors import SendError
from .senders.base import Sender, SendResult

__all__ = ["Delivery", "Outcome", "ErrorCallback", "SuccessCallback"]


ErrorCallback = Callable[[SendError, List[Dict[str, Any]]], Any]
SuccessCallback = Callable[[BatchResponse], Any]


@dataclass
class Outcome:
    """What became of the events handed to one :meth:`Delivery.send` call."""

    sent: int = 0
    failed: int = 0
    unsent: Optional[List[bytes]] = None
    responses: Optional[List[BatchResponse]] = None
    errors: Optional[List[SendError]] = None


class _Books:
    """Counters guarded by one lock."""

    __slots__ = ("lock", "sent", "failed", "dropped", "retries", "requests")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sent = self.failed = self.dropped = self.retries = self.requests = 0


class Delivery:
    """Sends through ``sender``, counts, and reports to the callbacks.

    ``send`` blocks the calling thread (a transport's worker, a flushing caller, or the
    caller of a ``*_sync`` method); it never raises for a delivery failure.
    """

    def __init__(
        self,
        sender: Sender,
        *,
        on_error: Optional[ErrorCallback] = None,
        on_success: Optional[SuccessCallback] = None,
    ) -> None:
        self.sender = sender
        self.on_error = on_error
        self.on_success = on_success
        self._books = _Books()

    # ---------------------------------------------------------------- counters

    def counters(self) -> Dict[str, int]:
        b = self._books
        with b.lock:
            return {
                "sent": b.sent,
                "failed": b.failed,
                "dropped": b.dropped,
                "retries": b.retries,
                "requests": b.requests,
            }

    def after_fork(self) -> None:
        """In a forked child: fresh counters and lock, fresh sender connections."""
        self._books = _Books()
        self.sender.after_fork()

    def has_error_callback(self) -> bool:
        """Would a failure be handed to an ``on_error`` callback (not just logged)?"""
        return (self.on_error or defaults.on_error) is not None

    # ---------------------------------------------------------------- sending

    def send(
        self,
        events: Sequence[bytes],
        deadline: Deadline,
        *,
        claim: Optional[Callable[[], bool]] = None,
        report: bool = True,
        keep_unsent: bool = False,
    ) -> Outcome:
        """Deliver ``events`` (any number), in order, within ``deadline``.

        The events are split to the sender's limits; a batch refused as too large (413) is
        halved and retried down to single events. When ``claim`` is given it is called once
        before anything is counted: if it returns False the events were already accounted
        for elsewhere (a shutdown that gave up on them) and this outcome is dropped. With
        ``report`` False, failures are counted but not handed to ``on_error`` (the caller
        raises them instead). With ``keep_unsent``, events the deadline kept from being
        delivered (not started, or cut off while retrying a transient failure) are neither
        counted nor reported but returned in ``Outcome.unsent`` for the caller to keep.
        """
        outcome = Outcome(responses=[], errors=[], unsent=[])
        failed_events: List[tuple[SendError, List[bytes]]] = []
        requests = retries = 0
        sender = self.sender
        pending = split_batches(list(events), sender.max_batch_events, sender.max_batch_bytes)
        while pending:
            if keep_unsent and deadline.expired():
                for batch in pending:
                    outcome.unsent.extend(batch)  # type: ignore[union-attr]
                break
            batch = pending.pop(0)
            try:
                result = sender.send(batch, deadline)
            except Exception as exc:  # a sender must not raise; if it does, the batch failed
                logger.exception("klime: sender %r raised", sender)
                result = SendResult(
                    None, SendError(f"sender raised {type(exc).__name__}"), tuple(range(len(batch)))
                )
            requests += result.requests
            retries += result.retries
            if result.too_large and len(batch) > 1 and not deadline.expired():
                half = len(batch) // 2
                pending[0:0] = [batch[:half], batch[half:]]
                logger.info("klime: batch of %d events too large for the server; splitting", len(batch))
                continue
            if result.response is not None:
                outcome.responses.append(result.response)  # type: ignore[union-attr]
            if result.error is None:
                outcome.sent += len(batch)
                continue
            if keep_unsent and result.deadline_reached:
                kept = set(result.failed)
                outcome.unsent.extend(batch[i] for i in sorted(kept))  # type: ignore[union-attr]
                outcome.sent += len(batch) - len(kept)
                continue
            failed_set = set(result.failed)
            outcome.sent += len(batch) - len(failed_set)
            outcome.failed += len(failed_set)
            lost = [batch[i] for i in sorted(failed_set)]
            failed_events.append((result.error, lost))
            outcome.errors.append(result.error)  # type: ignore[union-attr]
        if claim is not None and not claim():
            logger.debug("klime: a batch finished after its owner gave up on it; not counted")
            return Outcome()
        b = self._books
        with b.lock:
            b.sent += outcome.sent
            b.failed += outcome.failed
            b.requests += requests
            b.retries += retries
        for error, lost in failed_events:
            error.events = decode_all(lost)
            if report:
                self.report_error(error)
        on_success = self.on_success or defaults.on_success
        if on_success is not None:
            for response in outcome.responses or ():
                self._call(on_success, response)
        return outcome

    def send_sync(
        self,
        events: Sequence[bytes],
        deadline: Deadline,
        *,
        claim: Optional[Callable[[], bool]] = None,
    ) -> BatchResponse:
        """Deliver now on this thread; return the combined response or raise SendError."""
        outcome = self.send(events, deadline, report=False, claim=claim)
        if outcome.errors:
            first = outcome.errors[0]
            if len(outcome.errors) > 1:
                for other in outcome.errors[1:]:
                    first.events.extend(other.events)
            raise first
        return _combine(outcome.responses or [], len(events))

    # ---------------------------------------------------------------- not sent by a sender

    def acknowledge(self, count: int) -> None:
        """Count ``count`` events as delivered without a sender (the memory transport)."""
        b = self._books
        with b.lock:
            b.sent += count

    def drop(self, events: Sequence[bytes], reason: str, *, counted: bool = False) -> None:
        """Count ``events`` as dropped (never sent) and report them to ``on_error``.

        ``counted``: the caller already counted them (a transport that counts drops the
        moment they happen and reports them later, off the hot path).
        """
        if not events:
            return
        if not counted:
            b = self._books
            with b.lock:
                b.dropped += len(events)
        self._report_lost(events, reason, retryable=False)

    def fail(self, events: Sequence[bytes], reason: str) -> None:
        """Count ``events`` as failed (sent, outcome unknown or negative) and report them."""
        if not events:
            return
        b = self._books
        with b.lock:
            b.failed += len(events)
        self._report_lost(events, reason, retryable=True)

    def _report_lost(self, events: Sequence[bytes], reason: str, *, retryable: bool) -> None:
        if (self.on_error or defaults.on_error) is None:  # nobody to hand the events to
            logger.error("klime: %d events not delivered: %s", len(events), reason)
            return
        self.report_error(SendError(reason, None, decode_all(events), retryable=retryable))

    # ---------------------------------------------------------------- callbacks

    def report_error(self, error: SendError) -> None:
        """Hand ``error`` (and its events) to ``on_error``, else log it. Never raises."""
        callback = self.on_error or defaults.on_error
        if callback is None:
            logger.error("klime: %d events not delivered: %s", len(error.events), error.message)
            return
        self._call(callback, error, error.events)

    @staticmethod
    def _call(callback: Callable[..., Any], *args: Any) -> None:
        try:
            callback(*args)
        except BaseException as exc:  # SystemExit included: it must not kill a klime thread
            if isinstance(exc, KeyboardInterrupt) and threading.current_thread() is threading.main_thread():
                raise
            name = getattr(callback, "__qualname__", None) or type(callback).__name__
            logger.exception("klime: callback %s raised; ignored", name)


def _combine(responses: List[BatchResponse], count: int) -> BatchResponse:
    if len(responses) == 1:
        return responses[0]
    errors: List[EventError] = []
    offset = 0
    for r in responses:
        errors.extend(EventError(e.index + offset, e.message, e.code) for e in r.errors)
        offset += r.accepted + r.failed
    accepted = sum(r.accepted for r in responses)
    status_code = responses[-1].status_code if responses else 200
    return BatchResponse("ok", accepted, count - accepted, tuple(errors), status_code)

"""Delivery: hands batches to the sender's retry loop and settles them in the ledger.

Every transport delivers through one :class:`Delivery`, so splitting to the sender's limits,
driving each batch through :func:`~klime.senders.base.send_with_retries` (the 413 split
included), the counts of the conservation law (its :class:`~klime._ledger.Ledger`) and the
``on_success`` / ``on_error`` callbacks live in exactly one place. Thread-safe.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

from ._batching import split_batches
from ._deadline import Deadline
from ._events import decode_all
from ._ledger import Ledger
from ._logging import log
from ._logging import log as logger
from ._models import BatchResponse, EventError
from ._retry import FIRST_TRY, Retry
from ._settings import defaults
from .errors import SendError
from .senders.base import Pace, Sender, SendResult, send_with_retries, split_too_large

__all__ = [
    "Delivery",
    "Outcome",
    "KEEP_DEFERRED",
    "KEEP_UNSENT",
    "KEEP_TRANSIENT",
    "ErrorCallback",
    "SuccessCallback",
    "EPISODE_FAILED",
    "EPISODE_REJECTED",
    "EPISODE_UNSENT",
]

#: What :meth:`Delivery.send` hands back to its caller, uncounted: deferred events only;
#: those too that the deadline kept from delivery; those too whose retries ran out on a
#: transient failure (a durable spool keeps them).
KEEP_DEFERRED = "deferred"
KEEP_UNSENT = "unsent"
KEEP_TRANSIENT = "transient"

#: Loss episodes (see :meth:`klime._logging._Log.notice`): a server that keeps failing,
#: a server that refuses events; both end at the next fully successful request.
EPISODE_FAILED = "loss-failed"
EPISODE_REJECTED = "loss-rejected"
#: Events given up on without a server's verdict (a shutdown deadline, a closed client).
EPISODE_UNSENT = "loss-unsent"


def _cut(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


#: ``on_error(error, events)``: the events are :class:`klime.types.Event` objects (wire dicts
#: that also read as klime 1.x's events). Typed ``List[Any]`` so that a callback annotated
#: either way (``list[dict[str, Any]]``, or klime 1.x's ``List[Event]``) type-checks.
ErrorCallback = Callable[[SendError, List[Any]], Any]
SuccessCallback = Callable[[BatchResponse], Any]


@dataclass
class Outcome:
    """What became of the events handed to one :meth:`Delivery.send` call."""

    sent: int = 0
    failed: int = 0
    unsent: Optional[List[bytes]] = None
    responses: Optional[List[BatchResponse]] = None
    errors: Optional[List[SendError]] = None
    #: where the deferred events stand in their retries (the most attempts any has had)
    retry: Retry = FIRST_TRY
    #: why the last batch handed back (deferred, cut off, exhausted) last failed
    last_error: Optional[SendError] = None
    #: events came back because their retries ran out (:data:`KEEP_TRANSIENT`)
    exhausted: bool = False


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
        #: the one place that counts (see :mod:`klime._ledger`)
        self.ledger = Ledger()

    # ---------------------------------------------------------------- counters

    def counters(self) -> Dict[str, int]:
        """The ledger's counts now. Non-blocking; thread-safe."""
        return self.ledger.tally().as_dict()

    def after_fork(self) -> None:
        """In a forked child: a fresh ledger (with the same transports), fresh sender
        connections."""
        self.ledger = self.ledger.fresh()
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
        settle: Optional[Callable[[Outcome], bool]] = None,
        report: bool = True,
        keep: str = KEEP_DEFERRED,
        pace: Optional[Pace] = None,
        retry: Retry = FIRST_TRY,
    ) -> Outcome:
        """Deliver ``events`` (any number), in order, within ``deadline``.

        The events are split to the sender's limits; a batch refused as too large (413) is
        halved and retried down to single events. When ``settle`` is given it is called once,
        with the outcome (its ``unsent`` are handed back to the caller, see below), before
        anything is counted:
        if it returns False the events were already accounted for elsewhere (a shutdown
        that gave up on them) and this outcome is dropped. With ``report`` False, failures
        are counted but not handed to ``on_error`` (the caller raises them instead).

        Events come back to the caller in ``Outcome.unsent``, neither counted nor reported,
        when they were deferred (``pace`` asked not to retry now); ``keep`` says what else
        comes back: :data:`KEEP_UNSENT` (a caller that sends them again later) adds what the
        deadline kept from being delivered (not started, or cut off while retrying a
        transient failure); :data:`KEEP_TRANSIENT` (a durable spool keeps them) adds those
        too and the events whose retries ran out on a transient failure, not counted as
        failed nor reported (``Outcome.exhausted`` is then True); permanent rejections are
        counted and reported as always. ``pace`` and ``retry`` (the batch's retry value) go
        to :func:`~klime.senders.base.send_with_retries`; ``Outcome.retry`` is then the
        retry value of the deferred events.
        """
        keep_unsent = keep == KEEP_UNSENT
        keep_transient = keep == KEEP_TRANSIENT
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
                result = send_with_retries(sender, batch, deadline, retry=retry, pace=pace)
            except Exception as exc:  # a sender must not raise; if it does, the batch failed
                logger.exception("klime: sender %r raised", sender)
                result = SendResult(
                    None, SendError(f"sender raised {type(exc).__name__}"), tuple(range(len(batch)))
                )
            requests += result.requests
            retries += result.retries
            halves = None if deadline.expired() else split_too_large(result, batch)
            if halves is not None:
                pending[0:0] = list(halves)
                logger.info("klime: batch of %d events too large for the server; splitting", len(batch))
                continue
            if result.response is not None:
                outcome.responses.append(result.response)  # type: ignore[union-attr]
            if result.error is None:
                outcome.sent += len(batch)
                continue
            exhausted = (
                keep_transient
                and result.response is None
                and result.error.retryable
                and not result.too_large
                and not result.deferred
            )
            if result.deferred or exhausted or ((keep_unsent or keep_transient) and result.deadline_reached):
                kept = set(result.failed)
                outcome.unsent.extend(batch[i] for i in sorted(kept))  # type: ignore[union-attr]
                outcome.sent += len(batch) - len(kept)
                if result.deferred and result.retry.attempts > outcome.retry.attempts:
                    outcome.retry = result.retry
                if exhausted and not result.deadline_reached:
                    outcome.exhausted = True
                outcome.last_error = result.error
                continue
            failed_set = set(result.failed)
            outcome.sent += len(batch) - len(failed_set)
            outcome.failed += len(failed_set)
            lost = [batch[i] for i in sorted(failed_set)]
            failed_events.append((result.error, lost))
            outcome.errors.append(result.error)  # type: ignore[union-attr]
        if settle is not None and not settle(outcome):
            logger.debug("klime: a batch finished after its owner gave up on it; not counted")
            return Outcome()
        self.ledger.count(sent=outcome.sent, failed=outcome.failed, requests=requests, retries=retries)
        if outcome.sent and not failed_events:
            self._recovered()
        for error, lost in failed_events:
            error.events = decode_all(lost)
            self._notice_loss(error, len(lost))
            if report:
                self.report_error(error)
        on_success = self.on_success or defaults.on_success
        if on_success is not None:
            for response in outcome.responses or ():
                self._call(on_success, response)
        return outcome

    # ---------------------------------------------------------------- loss episodes

    @staticmethod
    def _notice_loss(error: SendError, count: int) -> None:
        """One warning per episode of lost events (stderr too when no logging is set up)."""
        if error.response is not None:
            log.notice(
                EPISODE_REJECTED,
                "klime: the server rejected %d events of a batch (%s); they are reported to "
                "on_error, not retried. Further rejections are logged per batch until the "
                "next fully accepted one",
                count,
                _cut(error.message),
            )
        elif error.retryable:
            log.notice(
                EPISODE_FAILED,
                "klime: events are not being delivered: %s. %d events were reported to "
                "on_error and are lost; further failures are logged per batch until a "
                "request succeeds",
                _cut(error.message),
                count,
            )
        else:
            log.notice(
                EPISODE_REJECTED,
                "klime: the server refused a batch for good: %s. %d events were reported to "
                "on_error and are lost; check the write key and the endpoint",
                _cut(error.message),
                count,
            )

    @staticmethod
    def _recovered() -> None:
        for key in (EPISODE_FAILED, EPISODE_REJECTED, EPISODE_UNSENT):
            if log.end_episode(key):
                log.info("klime: delivery works again")

    def send_sync(
        self,
        events: Sequence[bytes],
        deadline: Deadline,
        *,
        settle: Optional[Callable[[Outcome], bool]] = None,
    ) -> BatchResponse:
        """Deliver now on this thread; return the combined response or raise SendError."""
        outcome = self.send(events, deadline, report=False, settle=settle)
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
        self.ledger.count(sent=count)

    def drop(
        self, events: Sequence[bytes], reason: str, *, counted: bool = False, notice: bool = True
    ) -> None:
        """Count ``events`` as dropped (never sent) and report them to ``on_error``.

        ``counted``: the caller already counted them (a transport that counts drops the
        moment they happen and reports them later, off the hot path). ``notice``: warn once
        per episode (False: the caller warns in its own words, e.g. a full queue).
        """
        if not events:
            return
        if not counted:
            self.ledger.count(dropped=len(events))
        self._report_lost(events, reason, retryable=False, notice=notice)

    def fail(self, events: Sequence[bytes], reason: str) -> None:
        """Count ``events`` as failed (sent, outcome unknown or negative) and report them."""
        if not events:
            return
        self.ledger.count(failed=len(events))
        self._report_lost(events, reason, retryable=True, notice=True)

    def _report_lost(self, events: Sequence[bytes], reason: str, *, retryable: bool, notice: bool) -> None:
        if notice:
            log.notice(
                EPISODE_UNSENT,
                "klime: %d events were not delivered: %s",
                len(events),
                _cut(reason),
            )
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

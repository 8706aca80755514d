"""The Sender interface, and the one retry loop.

A sender delivers one batch somewhere (WHERE). A sender of klime's own (HTTP) makes ONE
attempt per :meth:`Sender.attempt` call and describes it in an :class:`Attempt` value
(ok | partial | retry | refused | too_large); it never retries, never sleeps between
attempts and never calls anything of its caller's. :func:`send_with_retries` is the one
place that retries: it drives the attempts of one batch with the batch's frozen
:class:`~klime._retry.Retry` value and the sender's :class:`~klime._retry.RetryPolicy`,
and tells the caller's :data:`Pace` about each outcome — that is how the transport that
owns the batch (WHEN) feeds its concurrency limit and, while more are in flight than the
limit allows, takes a transiently failing batch back *deferred* (nothing counted) to send
later. Data flows down: the loop calls the sender; the sender calls nobody.

A user's sender that implements only :meth:`Sender.send` keeps working: one ``send`` call
is one attempt whose result is final (the loop does not retry it).

May import: the model (:mod:`klime._retry`, the deadline, the errors).
"""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass, replace
from typing import Callable, List, Optional, Sequence, Tuple, TypeVar

from .._config import MAX_BATCH_EVENTS, MAX_REQUEST_BYTES
from .._deadline import Deadline
from .._logging import log as logger
from .._models import BatchResponse
from .._retry import FIRST_TRY, Retry, RetryPolicy
from ..errors import SendError

__all__ = [
    "Attempt",
    "Pace",
    "RetryPolicy",
    "Sender",
    "SendResult",
    "send_with_retries",
    "split_too_large",
]

#: The destination took the request (all or some of its events): it is healthy.
ATTEMPT_OK = "ok"
#: The destination failed in a way worth retrying (5xx, 408, 429, a timeout, a reset):
#: it may be overloaded.
ATTEMPT_TRANSIENT = "transient"
#: The destination refused the request for good (400, 401, 413, ...): says nothing of load.
ATTEMPT_REJECTED = "rejected"

#: Given to :func:`send_with_retries` by the transport that owns a batch: called after each
#: attempt with its outcome (one of the ``ATTEMPT_*`` strings), how long it took in seconds
#: and the CPU time it took on its thread in seconds (what the concurrency limit needs to
#: tell the wire's waits from the interpreter's). After a transient failure, a False answer
#: means "do not retry now": the batch comes back deferred.
Pace = Callable[[str, float, float], bool]

T = TypeVar("T")

#: :attr:`Attempt.kind` values.
OK = "ok"
PARTIAL = "partial"
RETRY = "retry"
REFUSED = "refused"
TOO_LARGE = "too_large"


@dataclass(frozen=True)
class Attempt:
    """The outcome of ONE request for one batch (:meth:`Sender.attempt`).

    ``kind``: ``ok`` (all accepted; ``response`` set), ``partial`` (a 2xx naming refused
    events: ``response``, ``error`` and ``failed`` set), ``retry`` (a transient failure:
    ``reason`` says what, ``retry_after`` is the server's wish in seconds, ``stale`` marks
    a pooled connection the peer had closed, ``cut_short`` an attempt the caller's
    deadline ended), ``refused`` (for good: ``error`` set) or ``too_large`` (the request
    was refused for its size: ``error`` set; the caller may split the batch).
    ``made``: a request reached the wire (False when it could not even be built, or, with
    ``cut_short``, when the deadline came before it could start).
    ``status`` is the HTTP status if any; ``duration`` the attempt's seconds; ``cpu`` the
    CPU seconds it took on its thread over the same span (None: not measured; the
    concurrency limit then takes the whole round trip for time off the CPU).
    """

    kind: str
    status: Optional[int] = None
    response: Optional[BatchResponse] = None
    error: Optional[SendError] = None
    failed: Tuple[int, ...] = ()
    reason: str = ""
    retry_after: Optional[float] = None
    stale: bool = False
    cut_short: bool = False
    made: bool = True
    duration: float = 0.0
    cpu: Optional[float] = None


@dataclass(frozen=True)
class SendResult:
    """The outcome of :meth:`Sender.send` for one batch.

    - all accepted: ``error`` is None.
    - some rejected (a partial 2xx): ``error`` is set, ``failed`` holds their indices, and
      ``response`` the server's answer; the others were accepted.
    - none accepted: ``error`` is set and ``failed`` holds every index.
    ``too_large`` is True when the destination refused the batch for its size (HTTP 413);
    the caller may split it and try the halves. ``deadline_reached`` is True when the
    caller's deadline, not the destination, ended the attempts. ``deferred`` is True when
    the caller's :data:`Pace` asked the retry loop to stop retrying for now: the events of
    ``failed`` were not delivered and are the caller's to send again (``error`` says why
    the last attempt failed). ``requests`` counts attempts made in this call, ``retries``
    those of them that repeated an earlier attempt.
    """

    response: Optional[BatchResponse]
    error: Optional[SendError] = None
    failed: Tuple[int, ...] = ()
    requests: int = 0
    retries: int = 0
    too_large: bool = False
    deadline_reached: bool = False
    deferred: bool = False
    #: where the batch stands in its retries after this call
    retry: Retry = FIRST_TRY


def attempt_outcome(result: SendResult) -> str:
    """The ``ATTEMPT_*`` outcome that describes a whole :class:`SendResult`."""
    if result.error is None or result.response is not None:
        return ATTEMPT_OK
    if result.error.retryable and not result.too_large:
        return ATTEMPT_TRANSIENT
    return ATTEMPT_REJECTED


class Sender(abc.ABC):
    """Delivers one batch of encoded events somewhere.

    ``send`` is called by one thread at a time per batch but may be called from several
    threads at once for different batches; implementations must be thread-safe. It must
    return by ``deadline`` (give up, don't sleep past it) and must never raise: every
    failure is described by the returned :class:`SendResult`.

    A sender whose ``send`` makes one attempt and should be retried by klime implements
    :meth:`attempt` instead, sets :attr:`retry_policy`, and lets ``send`` be
    :func:`send_with_retries` (klime's HTTP sender does).
    """

    #: Largest number of events per :meth:`send` call.
    max_batch_events: int = MAX_BATCH_EVENTS
    #: Largest request body (``{"batch":[...]}``) in bytes per :meth:`send` call.
    max_batch_bytes: int = MAX_REQUEST_BYTES
    #: Set by a sender that implements :meth:`attempt`: klime's retry loop retries its
    #: attempts within these limits. None: ``send`` is one attempt whose result is final.
    retry_policy: Optional[RetryPolicy] = None

    @abc.abstractmethod
    def send(self, events: Sequence[bytes], deadline: Deadline) -> SendResult:
        """Deliver ``events`` (encoded JSON, already within the limits above). Blocks."""

    def attempt(self, events: Sequence[bytes], deadline: Deadline) -> Attempt:
        """Make ONE request for ``events`` and describe it; never retries, never sleeps,
        never raises. Blocks for the request. This default (a sender that implements only
        :meth:`send`) is one :meth:`send` call, its result final: ``refused`` unless all
        or some were accepted."""
        started = time.monotonic()
        result = self.send(events, deadline)
        took = time.monotonic() - started
        if result.error is None:
            return Attempt(OK, response=result.response, duration=took)
        if result.response is not None:
            return Attempt(PARTIAL, response=result.response, error=result.error, failed=result.failed,
                           duration=took)
        kind = TOO_LARGE if result.too_large else REFUSED
        return Attempt(kind, error=result.error, failed=result.failed, duration=took)

    def prepare(self) -> None:
        """Load what sending needs (the HTTP library, say) now, on the calling thread, so
        that the first send does not. Blocks briefly (imports); idempotent; never raises
        for a send-time problem. This default does nothing."""

    def after_fork(self) -> None:
        """Called in a forked child before first use: drop inherited connections."""

    def close(self) -> None:
        """Release connections. Idempotent."""


# ------------------------------------------------------------------------------ the loop


def send_with_retries(
    sender: Sender,
    events: Sequence[bytes],
    deadline: Deadline,
    *,
    retry: Retry = FIRST_TRY,
    pace: Optional[Pace] = None,
    log_give_up: bool = True,
) -> SendResult:
    """Deliver one batch through ``sender``: the one retry loop of klime.

    A sender with a :attr:`Sender.retry_policy` is driven attempt by attempt: transient
    failures are retried after the policy's wait (the server's ``Retry-After`` first; a
    stale pooled connection once at once) until the attempts (``retry.attempts`` made
    earlier count) or ``deadline`` run out; after each attempt ``pace`` hears the outcome,
    and a False answer after a transient failure ends the call with the batch deferred.
    A sender without a policy is called once (``send``), its result final. With
    ``log_give_up`` False, running out of attempts is not logged here (the caller words
    it: the SQS sender, per message). Blocks
    (sleeps between attempts, never past ``deadline``); thread-safe; never raises.
    """
    policy = sender.retry_policy
    if policy is None:
        started, cpu_started = time.monotonic(), time.thread_time()
        result = sender.send(events, deadline)
        _tell(pace, attempt_outcome(result), time.monotonic() - started, time.thread_time() - cpu_started)
        return replace(result, retry=Retry(retry.attempts + result.requests))
    count = len(events)
    all_failed = tuple(range(count))
    first = retry.attempts
    retry = Retry(retry.attempts)  # the at-once stale retry: once per call; no Retry-After carried in
    while True:
        left = deadline.remaining()
        if left is not None and left <= 0:
            return _gave_up("deadline reached before the batch could be sent", None, all_failed, retry, first,
                            deadline_reached=True)
        try:
            outcome = sender.attempt(events, deadline)
        except Exception as exc:  # an attempt must not raise; if it does, the batch failed
            logger.exception("klime: sender %r raised", sender)
            return SendResult(None, SendError(f"sender raised {type(exc).__name__}"), all_failed,
                              retry.attempts - first, _retries(retry.attempts, first), retry=retry)
        cpu = 0.0 if outcome.cpu is None else outcome.cpu  # measured by the sender, once
        kind = outcome.kind
        if not outcome.made and outcome.cut_short:  # the deadline came before the request
            return _gave_up("deadline reached before the batch could be sent", None, all_failed, retry, first,
                            deadline_reached=True)
        if not outcome.made:
            _tell(pace, ATTEMPT_REJECTED, outcome.duration, cpu)
            return SendResult(None, outcome.error, all_failed, retry.attempts - first,
                              _retries(retry.attempts, first), retry=retry)
        at_once = kind == RETRY and outcome.stale and not retry.stale_retry_used
        retry = retry.attempted(retry_after=outcome.retry_after, stale=at_once)
        made_now, retries = retry.attempts - first, _retries(retry.attempts, first)
        if kind in (OK, PARTIAL):
            _tell(pace, ATTEMPT_OK, outcome.duration, cpu)
            error = outcome.error if kind == PARTIAL else None
            return SendResult(outcome.response, error, outcome.failed, made_now, retries, retry=retry)
        if kind in (REFUSED, TOO_LARGE):
            _tell(pace, ATTEMPT_REJECTED, outcome.duration, cpu)
            return SendResult(None, outcome.error, all_failed, made_now, retries, too_large=kind == TOO_LARGE,
                              retry=retry)
        reason, status = outcome.reason, outcome.status
        if outcome.cut_short:  # the deadline, not the server, ended the attempt
            _tell(pace, ATTEMPT_TRANSIENT, outcome.duration, cpu)
            return _gave_up(f"deadline reached during attempt {retry.attempts}: {reason}", None, all_failed,
                            retry, first, deadline_reached=True)
        go_on = at_once or _tell(pace, ATTEMPT_TRANSIENT, outcome.duration, cpu)
        if not go_on and not policy.exhausted(retry):
            logger.debug("klime: batch deferred after %d attempts: %s", retry.attempts, reason)
            return SendResult(
                None,
                SendError(f"not sent yet ({retry.attempts} attempts so far): {reason}", status,
                          retryable=True),
                all_failed, made_now, retries, deferred=True, retry=retry,
            )
        if policy.exhausted(retry):
            return _gave_up(f"gave up after {retry.attempts} attempts: {reason}", status, all_failed,
                            retry, first, log=log_give_up)
        wait = 0.0 if at_once else policy.wait(retry)
        left = deadline.remaining()
        if left is not None and wait >= left:
            return _gave_up(f"deadline reached while retrying ({retry.attempts} attempts): {reason}", status,
                            all_failed, retry, first, deadline_reached=True)
        logger.debug("klime: retrying a batch in %.2fs after %s", wait, reason)
        if wait and not deadline.sleep(wait):
            return _gave_up(f"deadline reached while retrying ({retry.attempts} attempts): {reason}", status,
                            all_failed, retry, first, deadline_reached=True)


def split_too_large(result: SendResult, items: Sequence[T]) -> Optional[Tuple[List[T], List[T]]]:
    """The two halves to send instead of a batch refused for its size (HTTP 413), or None
    when ``result`` is no such refusal or the batch is a single event. The one 413 rule of
    klime. Pure."""
    if not result.too_large or len(items) <= 1:
        return None
    half = len(items) // 2
    return list(items[:half]), list(items[half:])


def _gave_up(
    message: str,
    status: Optional[int],
    failed: Tuple[int, ...],
    retry: Retry,
    first: int,
    *,
    deadline_reached: bool = False,
    log: bool = True,
) -> SendResult:
    if log and not deadline_reached:
        logger.warning("klime: %s", message)
    return SendResult(
        None,
        SendError(message, status, retryable=True),
        failed,
        retry.attempts - first,
        _retries(retry.attempts, first),
        deadline_reached=deadline_reached,
        retry=retry,
    )


def _retries(made: int, first: int) -> int:
    """Attempts made in this call that repeated an earlier attempt of the batch."""
    return max(0, made - max(first, 1))


def _tell(pace: Optional[Pace], outcome: str, seconds: float, cpu: float) -> bool:
    """Report one attempt; True means "go on retrying". A hook that raises is ignored."""
    if pace is None:
        return True
    try:
        return bool(pace(outcome, seconds, cpu))
    except Exception:
        logger.exception("klime: a pace hook raised; ignored")
        return True

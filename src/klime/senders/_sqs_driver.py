"""The SendMessageBatch driver: packed messages onto one SQS queue, failed entries retried alone.

Given the messages :mod:`._sqs_packing` made of one batch, :meth:`BatchDriver.send` packs
them into as few ``SendMessageBatch`` calls as the limits allow (usually one): one pass is
one attempt (:meth:`BatchDriver.one_pass`). Klime's one retry loop
(:func:`~klime.senders.base.send_with_retries`) repeats the pass for the entries SQS
reported as failed, with klime's backoff, until they are accepted, found permanent
(``SenderFault``, a refused size), or attempts or the deadline run out. Each
failed message maps back to the indices of its events in :attr:`SendResult.failed`, so the
conservation law holds per event. It never raises and never creates the boto3 client (it
is handed a getter).

On a client whose connections honour an :class:`.http.AttemptClock` (the one
:class:`~klime.senders.sqs.SqsSender` builds; its getter says so by giving a budget, connect
+ read timeout), each call runs inside a clock of that budget and the caller's deadline and
ends by then in wall-clock time; a call cut so is a transient failure of its messages,
"SendMessageBatch: the answer did not complete within N s", sent again by the next pass.

Imports: the senders' base (:class:`SendResult`), :mod:`klime._retry`, :mod:`._sqs_packing`,
:mod:`.http` (:class:`~.http.AttemptClock` only), and below them :mod:`klime._models`,
:mod:`klime._deadline`, :mod:`klime._logging`, :mod:`klime.errors` and
:func:`klime.aws.client_error_info` (which imports no boto3).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, ContextManager, Dict, List, Optional, Sequence, Set, Tuple

from .._batching import BODY_OVERHEAD
from .._boto import client_error_info
from .._deadline import Deadline
from .._logging import log as logger
from .._models import BatchResponse, EventError
from .._retry import RetryPolicy
from ..errors import SendError
from ._sqs_packing import SQS_MAX_BATCH_BYTES, SQS_MAX_BATCH_ENTRIES, Message, entry, plan_calls
from .base import OK, RETRY, Attempt, Sender, SendResult, send_with_retries
from .http import AttemptClock

__all__ = ["BatchDriver"]

#: A call is not started with less time than this left: it could only end in a timeout
#: whose outcome is unknown (the messages may or may not be on the queue).
_MIN_CALL_TIME_S = 0.05

#: A call that raised with less than this left of its attempt clock was cut by the clock.
_CLOCK_RAN_OUT_S = 0.01

#: Error codes worth another attempt (throttling, service-side trouble).
_TRANSIENT_CODES = frozenset(
    {
        "RequestThrottled",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "ProvisionedThroughputExceededException",
        "SlowDown",
        "ServiceUnavailable",
        "InternalError",
        "InternalFailure",
        "RequestTimeout",
        "RequestTimeoutException",
        "KmsThrottled",
        "KMS.ThrottlingException",
        "KmsUnavailable",
        "EC2ThrottledException",
        "PriorRequestNotComplete",
        "TransactionInProgressException",
        "IDPCommunicationError",
    }
)

#: What a message that is too large for the queue is refused with.
_TOO_LARGE_HINTS = ("shorter than", "too long", "maximum message size", "message size")


class _Failure:
    __slots__ = ("code", "reason", "status", "transient")

    def __init__(self, reason: str, code: Optional[str], status: Optional[int], transient: bool) -> None:
        self.reason = reason
        self.code = code
        self.status = status
        self.transient = transient


class _Run:
    """The state of one :meth:`BatchDriver.send` call, message by message."""

    def __init__(self, messages: List[Message]) -> None:
        self.messages = messages
        self.budget: Optional[float] = None  # seconds a call may take, on a client bounding it
        self.accepted: Set[int] = set()
        self.failures: Dict[int, _Failure] = {}
        self.calls = 0
        self.retry_calls = 0
        self.deadline_hit = False
        self.too_large_hit = False
        self.pending: List[int] = []  # messages still to send (a transient failure, or not tried)
        self.passes = 0


class _Passes(Sender):
    """One batch's passes as a one-attempt sender for :func:`send_with_retries` (an
    :meth:`attempt` is a pass over the entries still pending)."""

    def __init__(self, driver: BatchDriver, sqs: Any, run: _Run) -> None:
        self._driver, self._sqs, self._run = driver, sqs, run
        self.retry_policy = driver.retry

    def send(self, events: Sequence[bytes], deadline: Deadline) -> SendResult:
        return send_with_retries(self, events, deadline, log_give_up=False)

    def attempt(self, events: Sequence[bytes], deadline: Deadline) -> Attempt:
        return self._driver.one_pass(self._sqs, self._run, deadline)


class BatchDriver:
    """Sends packed messages to ``queue_url`` with SendMessageBatch, with per-entry retries.

    ``group_id`` is the MessageGroupId of a FIFO queue (None for a standard one);
    ``errors`` is :mod:`botocore.exceptions`, passed in so that this module imports no
    botocore. Thread-safe: the per-call read timeout the client's hook reads
    (:meth:`call_read_timeout`) is per thread.
    """

    def __init__(
        self,
        *,
        queue_url: str,
        group_id: Optional[str],
        retry: RetryPolicy,
        read_timeout: float,
        max_message_bytes: int,
        errors: Any,
    ) -> None:
        self.queue_url = queue_url
        self.group_id = group_id
        self.retry = retry
        self.read_timeout = read_timeout
        self.max_message_bytes = max_message_bytes
        self._bx = errors
        self._local = threading.local()

    def call_read_timeout(self) -> Optional[float]:
        """The read timeout of the call this thread is making (the deadline's), or None."""
        return getattr(self._local, "read_timeout", None)

    def after_fork(self) -> None:
        self._local = threading.local()

    def classify(self, exc: BaseException) -> Tuple[_Failure, bool]:
        """A whole-call failure, and whether it means "message too large for the queue"."""
        bx = self._bx
        if isinstance(exc, bx.ClientError):
            code, message, status = client_error_info(exc)
            error = (getattr(exc, "response", None) or {}).get("Error") or {}
            query_code = str(error.get("QueryErrorCode") or "")
            short = code.rsplit(".", 1)[-1]
            transient = (
                short in _TRANSIENT_CODES
                or query_code in _TRANSIENT_CODES
                or (status is not None and (status >= 500 or status in (408, 429)))
            )
            too_large = (
                short in ("BatchRequestTooLong", "RequestEntityTooLarge")
                or query_code == "BatchRequestTooLong"
                or status == 413
                or (short == "InvalidParameterValue" and any(h in message.lower() for h in _TOO_LARGE_HINTS))
            )
            reason = f"{code}: {message}" if message else code
            return _Failure(reason, code or None, status, transient), too_large
        if isinstance(exc, (bx.NoCredentialsError, bx.PartialCredentialsError, bx.NoRegionError)):
            return _Failure(f"{type(exc).__name__}: {exc}", type(exc).__name__, None, False), False
        if isinstance(exc, (bx.ParamValidationError,)):
            return _Failure(f"invalid request: {exc}", "ParamValidationError", None, False), False
        # connection errors, timeouts, and anything else botocore raises: worth retrying
        return _Failure(f"{type(exc).__name__}: {exc}", None, None, True), False

    def send(
        self,
        client: Callable[[], Tuple[Any, Optional[float]]],
        messages: List[Message],
        count: int,
        deadline: Deadline,
    ) -> SendResult:
        """Enqueue ``messages`` (the ``count`` events of one batch), retrying failed entries only.

        ``client()`` returns the boto3 SQS client and the wall-clock budget of one call on
        it (connect + read timeout) when its connections honour an attempt clock, else None
        (it may raise: nothing is sent then). Blocks (one call per 10 messages / 1 MiB, plus
        retries) until every message is accepted or refused, or attempts or ``deadline``
        run out, each call ending by its budget or ``deadline``; thread-safe; never raises.
        """
        run = _Run(messages)
        pending: List[int] = []
        for i, m in enumerate(messages):
            if len(m.body) > self.max_message_bytes:
                run.failures[i] = _Failure(
                    f"an event of {len(m.body) - BODY_OVERHEAD} bytes does not fit an SQS message of "
                    f"max_message_bytes={self.max_message_bytes}",
                    "MessageTooLarge",
                    None,
                    False,
                )
            else:
                pending.append(i)
        sqs: Any = None
        if pending:
            try:
                sqs, run.budget = client()
            except Exception as exc:  # e.g. no region: nothing can be sent
                failure, _ = self.classify(exc)
                failure.transient = False
                logger.error("klime: cannot create the SQS client: %s", failure.reason)
                for i in pending:
                    run.failures[i] = failure
                pending = []
        run.pending = pending
        if pending:
            # klime's one retry loop drives the passes; each pass is one attempt of the
            # entries still pending (never those already accepted or refused for good)
            passes = _Passes(self, sqs, run)
            outcome = send_with_retries(passes, (), deadline, log_give_up=False)
            if outcome.deadline_reached:
                run.deadline_hit = True
        return self._result(run, count, run.pending)

    def one_pass(self, sqs: Any, run: _Run, deadline: Deadline) -> Attempt:
        """ONE attempt of the entries still pending in ``run``: as few SendMessageBatch calls
        as the limits allow. ``retry`` while some failed transiently; never sleeps."""
        messages, pending = run.messages, run.pending
        again = run.passes > 0
        run.passes += 1
        retry: List[int] = []
        sizes = [len(messages[i].body) for i in pending]
        for call in plan_calls(sizes, SQS_MAX_BATCH_ENTRIES, SQS_MAX_BATCH_BYTES):
            ids = [pending[k] for k in call]
            left = deadline.remaining()
            if left is not None and left < _MIN_CALL_TIME_S:
                run.deadline_hit = True
                retry.extend(ids)
                continue
            retry.extend(self._call(sqs, run, ids, deadline, again))
        run.pending = sorted(retry)
        if run.deadline_hit:
            return Attempt(RETRY, reason="deadline reached", cut_short=True)
        if run.pending:
            return Attempt(RETRY, reason=f"{len(run.pending)} SQS messages to retry")
        return Attempt(OK)

    def _call(self, sqs: Any, run: _Run, ids: List[int], deadline: Deadline, again: bool) -> List[int]:
        """One SendMessageBatch call for messages ``ids``; return those worth another try.
        Blocks for the call: by ``run.budget`` and ``deadline`` at most on a bounded client."""
        retry: List[int] = []
        left = deadline.remaining()
        self._local.read_timeout = None if left is None else min(self.read_timeout, max(left, 0.001))
        run.calls += 1
        if again:
            run.retry_calls += 1
        clock = None if run.budget is None else AttemptClock(run.budget, deadline)
        given = 0.0 if clock is None else clock.left()
        bounded: ContextManager[Any] = contextlib.nullcontext() if clock is None else clock
        try:
            with bounded:
                response = sqs.send_message_batch(
                    QueueUrl=self.queue_url, Entries=[entry(i, run.messages[i], self.group_id) for i in ids]
                )
        except Exception as exc:
            error_answer = isinstance(exc, self._bx.ClientError)  # an answer, read whole
            if clock is not None and clock.left() < _CLOCK_RAN_OUT_S and not error_answer:
                # Cut by the clock: the messages may or may not be on the queue. Sending them
                # again is safe: SQS delivers at least once anyway, and Klime keeps one event
                # per messageId (a FIFO queue also drops the copy by its deduplication id).
                reason = f"SendMessageBatch: the answer did not complete within {given:.1f} s"
                for i in ids:
                    run.failures[i] = _Failure(reason, None, None, True)
                after = deadline.remaining()
                if after is not None and after < _CLOCK_RAN_OUT_S:
                    run.deadline_hit = True
                return list(ids)
            failure, too_large = self.classify(exc)
            if too_large:
                run.too_large_hit = True
                failure.transient = False
                logger.warning_once(
                    f"sqs-too-large-{self.queue_url}",
                    "klime: the SQS queue refused a message as too large (%s); set max_message_bytes "
                    "to the queue's MaximumMessageSize",
                    failure.reason,
                )
            for i in ids:
                run.failures[i] = failure
            return list(ids) if failure.transient else []
        finally:
            self._local.read_timeout = None
        answered: Set[int] = set()
        for item in response.get("Successful") or ():
            ok = _entry_index(item.get("Id"), ids)
            if ok is not None:
                answered.add(ok)
                run.accepted.add(ok)
                run.failures.pop(ok, None)
        for item in response.get("Failed") or ():
            bad = _entry_index(item.get("Id"), ids)
            if bad is None or bad in answered:
                continue
            answered.add(bad)
            code = str(item.get("Code") or "")
            reason = f"{code}: {item.get('Message') or ''}".rstrip(": ")
            sender_fault = bool(item.get("SenderFault"))
            run.failures[bad] = _Failure(reason, code or None, None, not sender_fault)
            if not sender_fault:
                retry.append(bad)
        for i in ids:
            if i not in answered:  # neither accepted nor refused: ask again
                run.failures[i] = _Failure("no answer for this entry", None, None, True)
                retry.append(i)
        return retry

    def _result(self, run: _Run, count: int, pending: Sequence[int]) -> SendResult:
        messages, accepted, failures = run.messages, run.accepted, run.failures
        calls, retries, deadline_hit = run.calls, run.retry_calls, run.deadline_hit
        if len(accepted) == len(messages):
            return SendResult(BatchResponse("ok", count, 0, (), 200), None, (), calls, retries)
        for i in pending:  # still transiently failing when attempts or time ran out
            failure = failures.get(i)
            if failure is None:
                failures[i] = _Failure("deadline reached before the message could be sent", None, None, True)
            else:
                if deadline_hit:
                    prefix = "deadline reached while retrying"
                else:
                    prefix = f"gave up after {self.retry.max_attempts} attempts"
                failures[i] = _Failure(f"{prefix}: {failure.reason}", failure.code, failure.status, True)
        failed_msgs = sorted(i for i in range(len(messages)) if i not in accepted)
        failed = tuple(e for i in failed_msgs for e in range(messages[i].start, messages[i].end))
        first = failures[failed_msgs[0]]
        transient = any(failures[i].transient for i in failed_msgs)
        all_transient = all(failures[i].transient for i in failed_msgs)
        text = (
            f"SQS did not accept {len(failed_msgs)} of {len(messages)} messages "
            f"({len(failed)} of {count} events): {first.reason}"
        )
        if not accepted:
            if run.too_large_hit and not transient and count > 1:
                return SendResult(None, SendError(text, first.status), failed, calls, retries, too_large=True)
            if not deadline_hit and transient:
                logger.warning("klime: %s", text)
            elif not transient:
                logger.error("klime: %s", text)
            return SendResult(
                None,
                SendError(text, first.status, retryable=transient),
                failed,
                calls,
                retries,
                deadline_reached=deadline_hit and all_transient,
            )
        # Some messages were accepted: never ask the caller to keep (and resend) the batch.
        logger.warning("klime: %s", text)
        errors = tuple(
            EventError(e, failures[i].reason, failures[i].code)
            for i in failed_msgs
            for e in range(messages[i].start, messages[i].end)
        )
        response = BatchResponse("ok", count - len(failed), len(failed), errors, 200)
        return SendResult(
            response,
            SendError(text, first.status, response=response, retryable=transient),
            failed,
            calls,
            retries,
        )


def _entry_index(entry_id: Any, ids: List[int]) -> Optional[int]:
    try:
        i = int(entry_id)
    except (TypeError, ValueError):
        return None
    return i if i in ids else None

"""The SQS sender: a durable hand-off of Klime batches to an Amazon SQS queue.

Each SQS message body is one Klime request body, ``{"batch":[event, ...]}`` (at most
``events_per_message`` events and ``max_message_bytes`` bytes), so a forwarder (see
``klime.integrations.lambda``) can POST it to Klime as it is. Messages go out with
``SendMessageBatch``, up to 10 per call and 1 MiB per call (SQS's limits). Needs boto3:
``pip install "klime[aws]"``.

How one :meth:`SqsSender.send` call works: the batch Delivery hands over (the transport's
batch, usually ``max_batch_size`` events) is cut into messages, the messages are packed
into as few ``SendMessageBatch`` calls as the limits allow (usually one), and entries
SQS reports as failed are retried alone, with klime's backoff, until they are accepted,
found permanent (``SenderFault``), or attempts or the deadline run out. Each failed entry
maps back to the indices of its events in :attr:`SendResult.failed`, so the conservation
law holds per event.
"""

from __future__ import annotations

import hashlib
import threading
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple
from urllib.parse import urlsplit

from .._batching import BODY_OVERHEAD, batch_body, split_batches
from .._config import (
    DEFAULT_RETRY_INITIAL_DELAY_MS,
    DEFAULT_RETRY_MAX_ATTEMPTS,
    MAX_BATCH_EVENTS,
    MAX_EVENT_BYTES,
)
from .._deadline import Deadline
from .._events import message_id
from .._logging import log as logger
from .._models import BatchResponse, EventError
from ..aws import client_error_info, require_boto3
from ..errors import ConfigurationError, SendError
from ._retry import RetryPolicy
from .base import Sender, SendResult

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "SQS_MAX_BATCH_BYTES",
    "SQS_MAX_BATCH_ENTRIES",
    "SQS_MAX_MESSAGE_BYTES",
    "SqsSender",
    "plan_calls",
    "plan_messages",
    "sqs_safe",
]

#: SQS's own limits (2025 onward): a message and a whole SendMessageBatch call both carry at
#: most 1 MiB of message bodies; a call holds at most 10 entries.
SQS_MAX_MESSAGE_BYTES = 1_048_576
SQS_MAX_BATCH_BYTES = 1_048_576
SQS_MAX_BATCH_ENTRIES = 10
#: The smallest MaximumMessageSize a queue can have.
SQS_MIN_MESSAGE_BYTES = 1024

#: klime's default message size: 256 KiB fits every queue, including those created before
#: SQS raised its limit to 1 MiB (their MaximumMessageSize stays 256 KiB), and SQS bills
#: per 64 KiB of payload anyway, so larger messages save nothing.
DEFAULT_MAX_MESSAGE_BYTES = 262_144

#: Default socket timeouts of the SQS client, seconds (each call is also capped by the
#: caller's deadline where botocore allows it: the read timeout, per call).
DEFAULT_SQS_CONNECT_TIMEOUT_S = 2.0
DEFAULT_SQS_READ_TIMEOUT_S = 5.0

#: A call is not started with less time than this left: it could only end in a timeout
#: whose outcome is unknown (the messages may or may not be on the queue).
_MIN_CALL_TIME_S = 0.05

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


def sqs_safe(event: bytes) -> bytes:
    """``event`` with the characters SQS refuses in a message escaped.

    SQS accepts only the XML character range; klime's JSON (``ensure_ascii=False``) escapes
    control characters already, which leaves U+FFFE and U+FFFF. Both can only sit inside a
    JSON string, where ``\\ufffe`` / ``\\uffff`` mean the same. Pure; thread-safe.
    """
    if b"\xef\xbf" not in event:
        return event
    return event.replace(b"\xef\xbf\xbe", b"\\ufffe").replace(b"\xef\xbf\xbf", b"\\uffff")


def plan_messages(events: Sequence[bytes], max_events: int, max_bytes: int) -> List[Tuple[int, int]]:
    """Cut ``events`` into messages, returned as consecutive ``(start, end)`` index ranges.

    The cut is :func:`klime._batching.split_batches`'s: no message holds more than
    ``max_events`` events or a body (``{"batch":[...]}``) over ``max_bytes``, except an
    event too large for any message, which gets one of its own. Pure; thread-safe.
    """
    ranges: List[Tuple[int, int]] = []
    start = 0
    for batch in split_batches(events, max_events, max_bytes):
        ranges.append((start, start + len(batch)))
        start += len(batch)
    return ranges


def plan_calls(body_sizes: Sequence[int], max_entries: int, max_bytes: int) -> List[List[int]]:
    """Pack messages (by body size) into SendMessageBatch calls, keeping order.

    Returns lists of message indices: no call has more than ``max_entries`` messages or
    bodies adding up to more than ``max_bytes`` (a message larger than that alone gets a
    call of its own). Pure; thread-safe.
    """
    calls: List[List[int]] = []
    current: List[int] = []
    total = 0
    for i, n in enumerate(body_sizes):
        if current and (len(current) >= max_entries or total + n > max_bytes):
            calls.append(current)
            current, total = [], 0
        current.append(i)
        total += n
    if current:
        calls.append(current)
    return calls


def _region_from_queue_url(url: str) -> Optional[str]:
    host = (urlsplit(url).hostname or "").lower()
    labels = host.split(".")
    # sqs.<region>.amazonaws.com[.cn]  /  <region>.queue.amazonaws.com  /  vpce-...sqs.<region>.vpce...
    for i, label in enumerate(labels[:-1]):
        if label == "sqs" and i + 1 < len(labels) and labels[i + 1] not in ("amazonaws", "vpce"):
            return labels[i + 1]
        if label == "queue" and i > 0:
            return labels[i - 1]
    return None


def _is_aws_host(url: str) -> bool:
    host = (urlsplit(url).hostname or "").lower()
    return host.endswith((".amazonaws.com", ".amazonaws.com.cn", ".api.aws"))


class _Message:
    """One SQS message being sent: events ``[start, end)`` of the batch."""

    __slots__ = ("body", "dedup_id", "end", "start")

    def __init__(self, start: int, end: int, body: bytes, dedup_id: Optional[str]) -> None:
        self.start = start
        self.end = end
        self.body = body
        self.dedup_id = dedup_id


class _Failure:
    __slots__ = ("code", "reason", "status", "transient")

    def __init__(self, reason: str, code: Optional[str], status: Optional[int], transient: bool) -> None:
        self.reason = reason
        self.code = code
        self.status = status
        self.transient = transient


class SqsSender(Sender):
    """Sends Klime batches to the SQS queue at ``queue_url``; a forwarder POSTs them on.

    Usable under every transport (``background``, ``blocking``, ``invocation``)::

        client = klime.Client(sender=SqsSender("https://sqs.eu-west-1.amazonaws.com/123/klime"))

    Options:
        message_group_id: for a FIFO queue (a URL ending in ``.fifo``), the MessageGroupId of
            every message (default ``"klime"``: one ordered stream). Each message's
            MessageDeduplicationId is derived from its events' messageIds, so a retried
            message is never enqueued twice within SQS's 5-minute window.
        max_message_bytes: largest message body (default 256 KiB; at most the queue's
            MaximumMessageSize, at most SQS's 1 MiB).
        events_per_message: events per message (default and maximum 100: a message becomes
            one request to Klime).
        retry_max_attempts, retry_initial_delay: attempts per entry and first backoff delay
            in milliseconds (Ruby SDK units), as for the HTTP sender.
        connect_timeout, read_timeout: socket timeouts of the SQS client, seconds.
        client: a boto3 SQS client to use as it is (its retry and timeout settings included;
            not replaced after a fork, so give none if your process forks).
        region_name, endpoint_url: for the client klime builds (boto3's default credentials
            chain). The region defaults to the one in ``queue_url``; a queue URL whose host
            is not an AWS one (LocalStack, ElasticMQ, moto) is also used as the endpoint.

    Thread-safe: the boto3 client (created on first use, and afresh in a forked child) is
    shared by every thread. :meth:`send` blocks and never raises. Raises
    :class:`~klime.ConfigurationError` for a bad option and
    :class:`~klime.aws.MissingDependencyError` without boto3.
    """

    def __init__(
        self,
        queue_url: str,
        *,
        message_group_id: str = "klime",
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        events_per_message: int = MAX_BATCH_EVENTS,
        retry_max_attempts: int = DEFAULT_RETRY_MAX_ATTEMPTS,
        retry_initial_delay: float = DEFAULT_RETRY_INITIAL_DELAY_MS,
        connect_timeout: float = DEFAULT_SQS_CONNECT_TIMEOUT_S,
        read_timeout: float = DEFAULT_SQS_READ_TIMEOUT_S,
        client: Any = None,
        region_name: Optional[str] = None,
        endpoint_url: Optional[str] = None,
    ) -> None:
        self._boto3 = require_boto3("klime's SqsSender")
        from botocore import exceptions as botocore_exceptions

        self._bx = botocore_exceptions
        if not isinstance(queue_url, str) or not queue_url.strip():
            raise ConfigurationError("queue_url must be a non-empty SQS queue URL")
        queue_url = queue_url.strip()
        parts = urlsplit(queue_url)
        if parts.scheme not in ("http", "https") or not parts.hostname or not parts.path.strip("/"):
            raise ConfigurationError(
                "queue_url must be an SQS queue URL such as https://sqs.eu-west-1.amazonaws.com/123456789012/klime"
            )
        self.queue_url = queue_url
        self.fifo = parts.path.rstrip("/").endswith(".fifo")
        if not isinstance(message_group_id, str) or not 1 <= len(message_group_id) <= 128:
            raise ConfigurationError("message_group_id must be a string of 1 to 128 characters")
        self.message_group_id = message_group_id
        if (
            isinstance(max_message_bytes, bool)
            or not isinstance(max_message_bytes, int)
            or not SQS_MIN_MESSAGE_BYTES <= max_message_bytes <= SQS_MAX_MESSAGE_BYTES
        ):
            raise ConfigurationError(
                f"max_message_bytes must be an int from {SQS_MIN_MESSAGE_BYTES} to {SQS_MAX_MESSAGE_BYTES}"
            )
        if max_message_bytes < BODY_OVERHEAD + MAX_EVENT_BYTES:
            logger.warning(
                "klime: max_message_bytes=%d is below the largest event klime accepts (%d bytes); "
                "larger events will fail",
                max_message_bytes,
                MAX_EVENT_BYTES,
            )
        self.max_message_bytes = max_message_bytes
        if (
            isinstance(events_per_message, bool)
            or not isinstance(events_per_message, int)
            or not 1 <= events_per_message <= MAX_BATCH_EVENTS
        ):
            raise ConfigurationError(f"events_per_message must be an int from 1 to {MAX_BATCH_EVENTS}")
        self.events_per_message = events_per_message
        # Delivery hands over whole transport batches up to what ONE SendMessageBatch call
        # can carry: 10 messages and 1 MiB of bodies. Cutting a batch into k messages adds
        # (BODY_OVERHEAD - 1) bytes per extra message, hence the margin.
        self.max_batch_events = SQS_MAX_BATCH_ENTRIES * events_per_message
        self.max_batch_bytes = SQS_MAX_BATCH_BYTES - (SQS_MAX_BATCH_ENTRIES - 1) * (BODY_OVERHEAD - 1)
        self.retry = RetryPolicy(retry_max_attempts, float(retry_initial_delay) / 1000.0)
        self.connect_timeout = float(connect_timeout)
        self.read_timeout = float(read_timeout)
        if region_name is None:
            region_name = _region_from_queue_url(queue_url)
        if endpoint_url is None and not _is_aws_host(queue_url):
            endpoint_url = f"{parts.scheme}://{parts.netloc}"
        self.region_name = region_name
        self.endpoint_url = endpoint_url
        self._own_client = client is None
        self._client: Any = client
        self._lock = threading.Lock()
        self._local = threading.local()
        self._pid_warned = False

    def __repr__(self) -> str:
        return f"SqsSender(queue_url={self.queue_url!r})"

    # ------------------------------------------------------------------------- the client

    @property
    def client(self) -> Any:
        """The boto3 SQS client, created on first use (blocks ~50 ms then). Thread-safe."""
        client = self._client
        if client is None:
            with self._lock:
                client = self._client
                if client is None:
                    client = self._client = self._make_client()
        return client

    def _make_client(self) -> Any:
        from botocore.config import Config

        config = Config(
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
            retries={"total_max_attempts": 1},  # klime drives retries, within the deadline
            max_pool_connections=10,
        )
        session = self._boto3.session.Session()
        client = session.client(
            "sqs", region_name=self.region_name, endpoint_url=self.endpoint_url, config=config
        )
        client.meta.events.register("before-call.sqs.SendMessageBatch", self._cap_read_timeout)
        return client

    def _cap_read_timeout(self, context: Dict[str, Any], **_: Any) -> None:
        # botocore reads a per-request read timeout from the request context (recent
        # versions; older ones ignore it and keep the client's).
        timeout = getattr(self._local, "read_timeout", None)
        if timeout is not None:
            context["read_timeout"] = timeout

    def after_fork(self) -> None:
        self._lock = threading.Lock()
        self._local = threading.local()
        if self._own_client:
            self._client = None  # the parent's pooled sockets are the parent's
        elif not self._pid_warned:
            self._pid_warned = True
            logger.warning(
                "klime: SqsSender keeps the boto3 client it was given across a fork; "
                "create the sender without client= in processes that fork"
            )

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, (None if self._own_client else self._client)
        if client is not None and self._own_client:
            try:
                client.close()
            except Exception:
                pass

    # ------------------------------------------------------------------------- sending

    def _messages(self, events: Sequence[bytes]) -> List[_Message]:
        safe = [sqs_safe(e) for e in events]
        messages = []
        for start, end in plan_messages(safe, self.events_per_message, self.max_message_bytes):
            body = batch_body(safe[start:end])
            dedup = _dedup_id(events[start:end], body) if self.fifo else None
            messages.append(_Message(start, end, body, dedup))
        return messages

    def _entry(self, index: int, message: _Message) -> Dict[str, Any]:
        entry: Dict[str, Any] = {"Id": str(index), "MessageBody": message.body.decode("utf-8")}
        if self.fifo:
            entry["MessageGroupId"] = self.message_group_id
            entry["MessageDeduplicationId"] = message.dedup_id
        return entry

    def _classify(self, exc: BaseException) -> Tuple[_Failure, bool]:
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

    def send(self, events: Sequence[bytes], deadline: Deadline) -> SendResult:
        """Enqueue ``events`` as SQS messages, retrying failed entries only.

        Blocks (one ``SendMessageBatch`` per 10 messages / 1 MiB, plus retries) until every
        message is accepted or refused, or attempts or ``deadline`` run out; thread-safe;
        never raises.
        """
        count = len(events)
        if not count:
            return SendResult(BatchResponse("ok", 0, 0, (), 200))
        try:
            messages = self._messages(events)
        except Exception as exc:  # a malformed event: cannot happen for klime-encoded ones
            logger.exception("klime: could not build SQS messages")
            return SendResult(None, SendError(f"could not build SQS messages: {exc}"), tuple(range(count)))
        failures: Dict[int, _Failure] = {}
        pending: List[int] = []
        for i, m in enumerate(messages):
            if len(m.body) > self.max_message_bytes:
                failures[i] = _Failure(
                    f"an event of {len(m.body) - BODY_OVERHEAD} bytes does not fit an SQS message of "
                    f"max_message_bytes={self.max_message_bytes}",
                    "MessageTooLarge",
                    None,
                    False,
                )
            else:
                pending.append(i)
        accepted: Set[int] = set()
        policy = self.retry
        calls = retry_calls = 0
        attempt = 0
        deadline_hit = False
        too_large_hit = False
        client: Any = None
        if pending:
            try:
                client = self.client
            except Exception as exc:  # e.g. no region: nothing can be sent
                failure, _ = self._classify(exc)
                failure.transient = False
                logger.error("klime: cannot create the SQS client: %s", failure.reason)
                for i in pending:
                    failures[i] = failure
                pending = []
        while pending:
            attempt += 1
            retry: List[int] = []
            sizes = [len(messages[i].body) for i in pending]
            for call in plan_calls(sizes, SQS_MAX_BATCH_ENTRIES, SQS_MAX_BATCH_BYTES):
                ids = [pending[k] for k in call]
                left = deadline.remaining()
                if left is not None and left < _MIN_CALL_TIME_S:
                    deadline_hit = True
                    retry.extend(ids)
                    continue
                self._local.read_timeout = None if left is None else min(self.read_timeout, max(left, 0.001))
                calls += 1
                if attempt > 1:
                    retry_calls += 1
                try:
                    response = client.send_message_batch(
                        QueueUrl=self.queue_url, Entries=[self._entry(i, messages[i]) for i in ids]
                    )
                except Exception as exc:
                    failure, too_large = self._classify(exc)
                    if too_large:
                        too_large_hit = True
                        failure.transient = False
                        logger.warning_once(
                            f"sqs-too-large-{self.queue_url}",
                            "klime: the SQS queue refused a message as too large (%s); set max_message_bytes "
                            "to the queue's MaximumMessageSize",
                            failure.reason,
                        )
                    for i in ids:
                        failures[i] = failure
                    if failure.transient:
                        retry.extend(ids)
                    continue
                finally:
                    self._local.read_timeout = None
                answered: Set[int] = set()
                for item in response.get("Successful") or ():
                    ok = _entry_index(item.get("Id"), ids)
                    if ok is not None:
                        answered.add(ok)
                        accepted.add(ok)
                        failures.pop(ok, None)
                for item in response.get("Failed") or ():
                    bad = _entry_index(item.get("Id"), ids)
                    if bad is None or bad in answered:
                        continue
                    answered.add(bad)
                    code = str(item.get("Code") or "")
                    reason = f"{code}: {item.get('Message') or ''}".rstrip(": ")
                    sender_fault = bool(item.get("SenderFault"))
                    failures[bad] = _Failure(reason, code or None, None, not sender_fault)
                    if not sender_fault:
                        retry.append(bad)
                for i in ids:
                    if i not in answered:  # neither accepted nor refused: ask again
                        failures[i] = _Failure("no answer for this entry", None, None, True)
                        retry.append(i)
            pending = sorted(retry)
            if not pending:
                break
            if deadline_hit:
                break
            if attempt >= policy.max_attempts:
                break
            wait = policy.backoff(attempt)
            left = deadline.remaining()
            if left is not None and wait >= left:
                deadline_hit = True
                break
            logger.debug("klime: retrying %d SQS messages in %.2fs", len(pending), wait)
            if wait and not deadline.sleep(wait):
                deadline_hit = True
                break
        return self._result(
            events, messages, accepted, failures, pending, (calls, retry_calls), deadline_hit, too_large_hit
        )

    def _result(
        self,
        events: Sequence[bytes],
        messages: List[_Message],
        accepted: Set[int],
        failures: Dict[int, _Failure],
        pending: List[int],
        counts: Tuple[int, int],
        deadline_hit: bool,
        too_large_hit: bool,
    ) -> SendResult:
        count = len(events)
        calls, retries = counts
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
        n_msgs = len(failed_msgs)
        text = (
            f"SQS did not accept {n_msgs} of {len(messages)} messages "
            f"({len(failed)} of {count} events): {first.reason}"
        )
        if not accepted:
            if too_large_hit and not transient and len(events) > 1:
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


def _dedup_id(events: Sequence[bytes], body: bytes) -> str:
    """A FIFO MessageDeduplicationId: the SHA-256 of the events' messageIds (of the body for
    events klime did not encode), so the same events always get the same id."""
    try:
        text = "\n".join(message_id(e) for e in events).encode("ascii")
    except (ValueError, UnicodeDecodeError):
        text = body
    return hashlib.sha256(text).hexdigest()


def _entry_index(entry_id: Any, ids: List[int]) -> Optional[int]:
    try:
        i = int(entry_id)
    except (TypeError, ValueError):
        return None
    return i if i in ids else None

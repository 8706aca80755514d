"""An AWS Lambda handler that forwards Klime batches from an SQS queue to Klime's API.

Producers hand events to SQS with :class:`klime.senders.sqs.SqsSender` (each message body is
a Klime request body, ``{"batch":[...]}``); this handler, subscribed to the queue through an
event source mapping with ``ReportBatchItemFailures``, POSTs them to Klime with the HTTP
sender and tells Lambda which messages to leave on the queue::

    # handler setting: klime.integrations.lambda.forwarder.sqs_forwarder_handler
    # environment: KLIME_WRITE_KEY, or KLIME_WRITE_KEY_SSM_PARAMETER, or KLIME_WRITE_KEY_SECRET_ID

or, with options, in a module of your own (``lambda`` is a keyword, hence importlib)::

    import importlib
    make_sqs_forwarder = importlib.import_module("klime.integrations.lambda").make_sqs_forwarder
    handler = make_sqs_forwarder(retry_max_attempts=2)

What happens to a message:

- accepted by Klime (2xx, including events Klime rejected one by one, which are logged): done,
  Lambda deletes it;
- refused for good (400, 401, other 4xx but 408/429, or a body that is not a Klime batch,
  including one that cannot be parsed at all: not JSON, nested too deeply, too big):
  logged at ERROR and dropped, so it is not retried forever (``dead_letter_rejected=True``
  returns it as failed instead, for the queue's redrive policy to move to its dead-letter
  queue). Only that message is affected: the others of the batch are forwarded as usual;
- transient failure (5xx, 408, 429, network) once the in-invocation retries are spent, or no
  time left: returned in ``batchItemFailures``, with every message not yet forwarded, so SQS
  delivers them again after the visibility timeout. The handler stops at the first such
  failure: Klime is then likely unavailable, and for a FIFO queue Lambda requires the
  failed message and all that follow it to be returned.

Messages are packed into as few requests as Klime's limits allow (100 events, 10 MiB), and
the invocation's remaining time, less ``time_margin_ms``, bounds every attempt and backoff.
"""

from __future__ import annotations

import json
import threading
from collections import deque
from typing import Any, Deque, Dict, List, Optional, Set

from ..._batching import BODY_OVERHEAD, body_size, split_batches
from ..._config import (
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_ENDPOINT,
    DEFAULT_READ_TIMEOUT_S,
    ENV_ENDPOINT,
    ENV_WRITE_KEY,
    env,
)
from ..._deadline import Deadline
from ..._logging import log
from ...errors import ConfigurationError
from ...senders.base import Sender, split_too_large

__all__ = [
    "ENV_WRITE_KEY_SECRET_FIELD",
    "ENV_WRITE_KEY_SECRET_ID",
    "ENV_WRITE_KEY_SSM_PARAMETER",
    "SqsForwarder",
    "make_sqs_forwarder",
    "sqs_forwarder_handler",
]

#: Environment variables naming where the write key is kept, read when ``KLIME_WRITE_KEY``
#: is not set (see :mod:`klime.aws`).
ENV_WRITE_KEY_SSM_PARAMETER = "KLIME_WRITE_KEY_SSM_PARAMETER"
ENV_WRITE_KEY_SECRET_ID = "KLIME_WRITE_KEY_SECRET_ID"
ENV_WRITE_KEY_SECRET_FIELD = "KLIME_WRITE_KEY_SECRET_FIELD"

#: The queue retries for us, so each invocation retries little and soon.
DEFAULT_FORWARDER_RETRY_MAX_ATTEMPTS = 3
DEFAULT_FORWARDER_RETRY_INITIAL_DELAY_MS = 200
#: Time kept back from the invocation's deadline to answer Lambda.
DEFAULT_TIME_MARGIN_MS = 500

BatchItemFailures = Dict[str, List[Dict[str, str]]]


class _Unit:
    """Events for one request, each with the index of the SQS record it came from."""

    __slots__ = ("events", "owners")

    def __init__(self, events: List[bytes], owners: List[int]) -> None:
        self.events = events
        self.owners = owners


#: What parsing a hostile body can raise besides ValueError: nesting deeper than the
#: interpreter's recursion limit (``"[" * 100000``), or a body too big to hold decoded.
_UNPARSEABLE = (ValueError, TypeError, RecursionError, MemoryError)


def _events_of(body: Any) -> List[bytes]:
    """The encoded events of one message body; ValueError when it is not a Klime batch
    (a body that cannot be parsed at all, deep nesting included, is one of those)."""
    if not isinstance(body, str):
        raise ValueError("the message has no text body")
    try:
        return _decode_batch(body)
    except RecursionError:
        raise ValueError("the body is nested too deeply to parse") from None
    except MemoryError:
        raise ValueError("the body is too large to parse") from None
    except TypeError as exc:
        raise ValueError(f"the body cannot be parsed ({exc})") from None


def _decode_batch(body: str) -> List[bytes]:
    document = json.loads(body)
    items = document.get("batch") if isinstance(document, dict) else None
    if not isinstance(items, list):
        raise ValueError('the body has no "batch" list')
    events = []
    for item in items:
        if not isinstance(item, dict):
            raise ValueError("the batch holds something that is not an event object")
        # UnicodeEncodeError (a lone surrogate escaped in the JSON) is a ValueError too.
        text = json.dumps(item, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        events.append(text.encode("utf-8"))
    return events


def _remaining_ms(context: Any) -> Optional[float]:
    getter = getattr(context, "get_remaining_time_in_millis", None)
    if getter is None:
        return None
    try:
        return float(getter())
    except Exception:
        return None


class SqsForwarder:
    """A Lambda handler (``handler(event, context)``) for an SQS event source.

    Build it with :func:`make_sqs_forwarder`. The HTTP sender, and the write key, are set up
    on the first invocation and reused by later (warm) ones. Calling it blocks until the
    messages are forwarded or the invocation's time is nearly up; it is thread-safe.
    """

    def __init__(
        self,
        write_key: Optional[str] = None,
        endpoint: Optional[str] = None,
        *,
        sender: Optional[Sender] = None,
        retry_max_attempts: int = DEFAULT_FORWARDER_RETRY_MAX_ATTEMPTS,
        retry_initial_delay: float = DEFAULT_FORWARDER_RETRY_INITIAL_DELAY_MS,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
        read_timeout: float = DEFAULT_READ_TIMEOUT_S,
        allow_insecure_endpoint: bool = False,
        time_margin_ms: float = DEFAULT_TIME_MARGIN_MS,
        dead_letter_rejected: bool = False,
    ) -> None:
        if write_key is not None and (not isinstance(write_key, str) or not write_key):
            raise ConfigurationError("write_key must be a non-empty string")
        if sender is not None and not isinstance(sender, Sender):
            raise ConfigurationError(f"sender must be a klime Sender, not {type(sender).__name__}")
        margin_ok = isinstance(time_margin_ms, (int, float)) and not isinstance(time_margin_ms, bool)
        if not margin_ok or time_margin_ms < 0:
            raise ConfigurationError("time_margin_ms must be a number >= 0")
        self._write_key = write_key
        self._endpoint = endpoint
        self._http_options: Dict[str, Any] = {
            "retry_max_attempts": retry_max_attempts,
            "retry_initial_delay": retry_initial_delay,
            "connect_timeout": connect_timeout,
            "read_timeout": read_timeout,
            "allow_insecure_endpoint": allow_insecure_endpoint,
        }
        self.time_margin_ms = float(time_margin_ms)
        self.dead_letter_rejected = bool(dead_letter_rejected)
        self._sender = sender
        self._lock = threading.Lock()

    def __repr__(self) -> str:  # never shows the write key
        return f"<klime SqsForwarder sender={self._sender!r}>"

    # ------------------------------------------------------------------ set-up

    @property
    def sender(self) -> Sender:
        """The sender, built on first use from the options and the environment.

        Blocks on first use when the write key comes from SSM or Secrets Manager. Raises
        :class:`~klime.ConfigurationError` when no write key can be found.
        """
        sender = self._sender
        if sender is None:
            with self._lock:
                sender = self._sender
                if sender is None:
                    sender = self._sender = self._build_sender()
        return sender

    def _build_sender(self) -> Sender:
        from ...senders.http import HttpSender

        endpoint = self._endpoint or env(ENV_ENDPOINT) or DEFAULT_ENDPOINT
        return HttpSender(self._resolve_write_key(), endpoint, **self._http_options)

    def _resolve_write_key(self) -> str:
        if self._write_key:
            return self._write_key
        key = env(ENV_WRITE_KEY)
        if key:
            return key
        parameter = env(ENV_WRITE_KEY_SSM_PARAMETER)
        if parameter:
            from ...aws import write_key_from_ssm

            return write_key_from_ssm(parameter)
        secret = env(ENV_WRITE_KEY_SECRET_ID)
        if secret:
            from ...aws import write_key_from_secret

            return write_key_from_secret(secret, env(ENV_WRITE_KEY_SECRET_FIELD))
        raise ConfigurationError(
            f"the SQS forwarder needs a write key: pass write_key= or set {ENV_WRITE_KEY}, "
            f"{ENV_WRITE_KEY_SSM_PARAMETER} or {ENV_WRITE_KEY_SECRET_ID}"
        )

    def _deadline(self, context: Any) -> Deadline:
        remaining = _remaining_ms(context)
        if remaining is None:
            return Deadline()
        return Deadline.after(max(0.0, remaining - self.time_margin_ms) / 1000.0)

    # ------------------------------------------------------------------ one invocation

    def __call__(self, event: Any, context: Any = None) -> BatchItemFailures:
        records = event.get("Records") if isinstance(event, dict) else None
        if not isinstance(records, list):
            log.error("klime: the SQS forwarder got an event without Records; is its trigger an SQS queue?")
            return {"batchItemFailures": []}
        deadline = self._deadline(context)
        sender = self.sender
        fifo = any(
            isinstance(r, dict) and str(r.get("eventSourceARN") or "").endswith(".fifo") for r in records
        )

        returned: Set[int] = set()  # records to leave on the queue
        rejected: Set[int] = set()  # records refused for good (dropped, or dead-lettered)
        parsed: List[Optional[List[bytes]]] = []
        for index, record in enumerate(records):
            try:
                parsed.append(_events_of(record.get("body") if isinstance(record, dict) else None))
            except _UNPARSEABLE as exc:  # this record's failure only, never the batch's
                parsed.append(None)
                rejected.add(index)
                log.error(
                    "klime: SQS message %s is not a Klime batch (%s); %s",
                    _message_id(record),
                    exc,
                    "returned for the dead-letter queue" if self.dead_letter_rejected else "dropped",
                )
        units = self._pack(parsed, sender)

        sent = dropped = 0
        queue: Deque[_Unit] = deque(units)
        stop_reason = ""
        while queue:
            unit = queue[0]
            if fifo and self.dead_letter_rejected and rejected and min(rejected) <= unit.owners[0]:
                stop_reason = "a FIFO message before these was rejected"
                break
            if deadline.expired():
                stop_reason = "the invocation's time is nearly up"
                break
            queue.popleft()
            result = sender.send(unit.events, deadline)
            if result.error is None:
                sent += len(unit.events)
                continue
            halves = split_too_large(result, list(zip(unit.events, unit.owners)))
            if halves is not None:
                for half in reversed(halves):
                    queue.appendleft(_Unit([event for event, _ in half], [owner for _, owner in half]))
                continue
            if result.response is not None:  # 2xx with some events refused one by one
                sent += len(unit.events) - len(set(result.failed))
                dropped += len(set(result.failed))
                continue
            if result.error.retryable or result.deadline_reached:
                queue.appendleft(unit)
                stop_reason = result.error.message
                break
            owners = sorted(set(unit.owners))
            rejected.update(owners)
            dropped += len(unit.events)
            log.error(
                "klime: Klime refused %d events from SQS messages %s: %s; %s",
                len(unit.events),
                ", ".join(_message_id(records[i]) for i in owners),
                result.error.message,
                "returned for the dead-letter queue" if self.dead_letter_rejected else "dropped",
            )
        for unit in queue:
            returned.update(unit.owners)
        if fifo and returned:
            # Lambda's rule for FIFO queues: the first failed message and all after it.
            first = min(returned)
            returned.update(i for i in range(first, len(records)) if parsed[i] is not None)
        if self.dead_letter_rejected:
            returned.update(rejected)
        if returned:
            log.warning(
                "klime: returning %d of %d SQS messages to the queue: %s",
                len(returned),
                len(records),
                stop_reason or "rejected",
            )
        log.info(
            "klime: forwarded %d events from %d SQS messages (%d dropped, %d messages returned)",
            sent,
            len(records),
            dropped,
            len(returned),
        )
        failures = []
        for i in sorted(returned):
            record = records[i]
            message_id = record.get("messageId") if isinstance(record, dict) else None
            if isinstance(message_id, str) and message_id:
                failures.append({"itemIdentifier": message_id})
        return {"batchItemFailures": failures}

    @staticmethod
    def _pack(parsed: List[Optional[List[bytes]]], sender: Sender) -> List[_Unit]:
        """Whole messages packed into requests within the sender's limits, in order; a
        message too large for one request is split over several of its own."""
        max_events, max_bytes = sender.max_batch_events, sender.max_batch_bytes
        units: List[_Unit] = []
        events: List[bytes] = []
        owners: List[int] = []
        for index, message in enumerate(parsed):
            if not message:
                continue
            joined = body_size(events) + 1 + body_size(message) - BODY_OVERHEAD
            if events and (len(events) + len(message) > max_events or joined > max_bytes):
                units.append(_Unit(events, owners))
                events, owners = [], []
            if len(message) <= max_events and body_size(message) <= max_bytes:
                events.extend(message)
                owners.extend([index] * len(message))
                continue
            for part in split_batches(message, max_events, max_bytes):
                units.append(_Unit(part, [index] * len(part)))
        if events:
            units.append(_Unit(events, owners))
        return units


def _message_id(record: Any) -> str:
    message_id = record.get("messageId") if isinstance(record, dict) else None
    return str(message_id) if message_id else "<no messageId>"


def make_sqs_forwarder(
    write_key: Optional[str] = None, endpoint: Optional[str] = None, **options: Any
) -> SqsForwarder:
    """A Lambda handler forwarding an SQS queue's Klime batches to Klime.

    ``write_key`` falls back to ``KLIME_WRITE_KEY``, then to the SSM parameter named by
    ``KLIME_WRITE_KEY_SSM_PARAMETER``, then to the secret named by ``KLIME_WRITE_KEY_SECRET_ID``
    (field ``KLIME_WRITE_KEY_SECRET_FIELD`` if set); ``endpoint`` to ``KLIME_ENDPOINT``; both
    are looked up on the first invocation. ``options``: ``retry_max_attempts`` (default 3),
    ``retry_initial_delay`` (ms, default 200), ``connect_timeout``/``read_timeout`` (s),
    ``allow_insecure_endpoint``, ``time_margin_ms`` (default 500), ``dead_letter_rejected``
    (default False) and ``sender`` (another klime Sender). Does not block; raises
    :class:`~klime.ConfigurationError` for a bad option.
    """
    return SqsForwarder(write_key, endpoint, **options)


_default: Optional[SqsForwarder] = None
_default_lock = threading.Lock()


def sqs_forwarder_handler(event: Any, context: Any) -> BatchItemFailures:
    """The ready handler: ``klime.integrations.lambda.forwarder.sqs_forwarder_handler``.

    Configured from the environment only (see :func:`make_sqs_forwarder`); the forwarder is
    built on the first invocation and reused. Blocks; thread-safe.
    """
    global _default
    forwarder = _default
    if forwarder is None:
        with _default_lock:
            forwarder = _default
            if forwarder is None:
                forwarder = _default = SqsForwarder()
    return forwarder(event, context)

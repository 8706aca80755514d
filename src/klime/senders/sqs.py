"""The SQS sender: a durable hand-off of Klime batches to an Amazon SQS queue.

Each SQS message body is one Klime request body, ``{"batch":[event, ...]}`` (at most
``events_per_message`` events and ``max_message_bytes`` bytes), so a forwarder (see
``klime.integrations.lambda``) can POST it to Klime as it is. Messages go out with
``SendMessageBatch``, up to 10 per call and 1 MiB per call (SQS's limits). Needs boto3:
``pip install "klime[aws]"``.

How one :meth:`SqsSender.send` call works: the batch Delivery hands over (the transport's
batch, usually ``max_batch_size`` events) is cut into messages (:mod:`._sqs_packing`), and
the messages are sent by :class:`._sqs_driver.BatchDriver`, which packs them into as few
``SendMessageBatch`` calls as the limits allow and retries the entries SQS reports as failed.
This module holds the options and the boto3 client's life cycle (created on first use,
afresh after a fork).

**Each SendMessageBatch call is bounded in wall-clock time**, as an HTTP attempt is: it
ends by the least of ``connect_timeout + read_timeout`` and the caller's deadline (which
another thread may tighten meanwhile), whatever the server, a proxy or a man in the middle
does, an answer dripped one byte at a time included; it then fails as transient ("did not
complete within N s"). How, and why this way:

- botocore has no option or event that bounds a response read as a whole: ``Config``
  timeouts bound each socket operation (a server sending a byte now and then resets the
  read timeout), and the ``before-send`` event can only replace the send altogether, so
  klime would have to rebuild botocore's proxy, CA bundle, client certificate and socket
  settings to use it;
- so klime plugs its own connection-pool classes into the HTTP session of the client it
  builds (:func:`_bound_connections`): :func:`.http.bounded_pool_class` of the classes
  botocore put there (its Expect: 100-continue handling kept), whose connections cut every
  send and receive to what is left of the :class:`.http.AttemptClock` that the driver
  enters around each call, and look a new connection's name up on a bounded thread: the
  HTTP sender's own machinery, not a copy. The place is ``URLLib3Session``'s
  ``_pool_classes_by_scheme``, the one dict its pool manager and every proxy manager it
  makes use: private, but the same from botocore 1.29 (klime's floor) to 1.44, and checked
  before use: when it is not there or pools already exist, klime warns once and the calls
  keep botocore's per-read bound only (the read timeout cut to the deadline, on botocore
  1.43.68 or newer). Only klime's client is changed, before its first call; no global
  patching; no thread per call (a kept-alive connection makes no look-up);
- a watchdog thread that shuts a call's socket down when its time runs out would bound it
  too, but needs the same private access to find the socket, and a thread.

A ``client=`` of the user's is used as it is: klime changes neither its connection pools
nor its event hooks, so its calls are bounded by its own ``Config`` timeouts per socket
operation only; a server that drips its answer can hold such a call (and the flush or
shutdown waiting for it) past the caller's deadline. Let klime build the client
(``region_name=``, ``endpoint_url=``) for the wall-clock bound.

Imports: the senders' base, :mod:`klime._retry`, :mod:`._sqs_packing`, :mod:`._sqs_driver`,
:mod:`.http` (its pool classes; ``urllib3`` inside functions only), and below them
:mod:`klime._config`, :mod:`klime._batching`, :mod:`klime._logging`, :mod:`klime.errors` and
:mod:`klime.aws` (boto3 itself only when a sender is created).
"""

from __future__ import annotations

import threading
from typing import Any, Dict, Optional, Sequence, Tuple
from urllib.parse import urlsplit

from .._batching import BODY_OVERHEAD
from .._boto import require_boto3
from .._config import (
    DEFAULT_RETRY_INITIAL_DELAY_MS,
    DEFAULT_RETRY_MAX_ATTEMPTS,
    MAX_BATCH_EVENTS,
    MAX_EVENT_BYTES,
)
from .._deadline import Deadline
from .._logging import log as logger
from .._models import BatchResponse
from .._retry import RetryPolicy
from ..errors import ConfigurationError, SendError
from ._sqs_driver import BatchDriver
from ._sqs_packing import (
    DEFAULT_MAX_MESSAGE_BYTES,
    SQS_MAX_BATCH_BYTES,
    SQS_MAX_BATCH_ENTRIES,
    SQS_MAX_MESSAGE_BYTES,
    SQS_MIN_MESSAGE_BYTES,
    pack,
)
from .base import Sender, SendResult
from .http import bounded_pool_class

__all__ = ["SqsSender"]

#: Default socket timeouts of the SQS client, seconds; a call on klime's own client ends
#: within their sum in wall-clock time, or at the caller's deadline if that comes first.
DEFAULT_SQS_CONNECT_TIMEOUT_S = 2.0
DEFAULT_SQS_READ_TIMEOUT_S = 5.0


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
        connect_timeout, read_timeout: socket timeouts of the SQS client, seconds; each
            ``SendMessageBatch`` call ends within their sum, or at the caller's deadline,
            in wall-clock time, whatever the server does.
        client: a boto3 SQS client to use as it is (its retry and timeout settings included,
            and only its own per-socket-operation timeouts bound its calls: see the module's
            docstring; not replaced after a fork, so give none if your process forks).
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
        self._bounded_client: Any = None  # klime's client, once its calls are bounded
        self._lock = threading.Lock()
        self._pid_warned = False
        self._driver = BatchDriver(
            queue_url=queue_url,
            group_id=message_group_id if self.fifo else None,
            retry=self.retry,
            read_timeout=self.read_timeout,
            max_message_bytes=max_message_bytes,
            errors=botocore_exceptions,
        )

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
        if _bound_connections(client):
            self._bounded_client = client
        else:
            import botocore

            logger.warning_once(
                "sqs-unbounded-calls",
                "klime: cannot bound SQS calls in wall-clock time with botocore %s (its HTTP "
                "session is not laid out as klime expects); each call is bounded by its socket "
                "timeouts only",
                botocore.__version__,
            )
        return client

    def _client_for_call(self) -> Tuple[Any, Optional[float]]:
        """The client, and the wall-clock budget of one call on it (connect + read timeout)
        when its calls are bounded by an attempt clock, else None. Creates the client on
        first use (blocks then); thread-safe."""
        client = self.client
        bounded = client is self._bounded_client
        return client, (self.connect_timeout + self.read_timeout) if bounded else None

    def _cap_read_timeout(self, context: Dict[str, Any], **_: Any) -> None:
        # botocore reads a per-request read timeout from the request context (recent
        # versions; older ones ignore it and keep the client's).
        timeout = self._driver.call_read_timeout()
        if timeout is not None:
            context["read_timeout"] = timeout

    def after_fork(self) -> None:
        self._lock = threading.Lock()
        self._driver.after_fork()
        if self._own_client:
            self._client = self._bounded_client = None  # the parent's pooled sockets are the parent's
        elif not self._pid_warned:
            self._pid_warned = True
            logger.warning(
                "klime: SqsSender keeps the boto3 client it was given across a fork; "
                "create the sender without client= in processes that fork"
            )

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, (None if self._own_client else self._client)
            if self._own_client:
                self._bounded_client = None
        if client is not None and self._own_client:
            try:
                client.close()
            except Exception:
                pass

    # ------------------------------------------------------------------------- sending

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
            messages = pack(events, self.events_per_message, self.max_message_bytes, fifo=self.fifo)
        except Exception as exc:  # a malformed event: cannot happen for klime-encoded ones
            logger.exception("klime: could not build SQS messages")
            return SendResult(None, SendError(f"could not build SQS messages: {exc}"), tuple(range(count)))
        return self._driver.send(self._client_for_call, messages, count, deadline)


def _bound_connections(client: Any) -> bool:
    """Make the connections of ``client`` (a boto3 client klime built, before its first
    call) honour the :class:`.http.AttemptClock` entered on the calling thread: botocore's
    pool classes in its HTTP session are replaced by :func:`.http.bounded_pool_class` of
    themselves. False, with nothing changed, when the session is not laid out as expected
    (another botocore, another HTTP session class) or already holds pools. Not thread-safe:
    call it on a client no other thread has yet; non-blocking."""
    from urllib3.connection import HTTPConnection
    from urllib3.connectionpool import HTTPConnectionPool

    session = getattr(getattr(client, "_endpoint", None), "http_session", None)
    classes: Any = getattr(session, "_pool_classes_by_scheme", None)
    manager: Any = getattr(session, "_manager", None)
    shared_with_manager = getattr(manager, "pool_classes_by_scheme", None) is classes
    if not (isinstance(classes, dict) and shared_with_manager):
        return False
    pools = getattr(manager, "pools", None)
    if pools is None or len(pools):
        return False
    bounded: Dict[str, Any] = {}
    for scheme in ("http", "https"):
        pool: Any = classes.get(scheme)
        if not (
            isinstance(pool, type)
            and issubclass(pool, HTTPConnectionPool)
            and isinstance(pool.ConnectionCls, type)
            and issubclass(pool.ConnectionCls, HTTPConnection)
        ):
            return False
        bounded[scheme] = bounded_pool_class(classes[scheme])
    classes.update(bounded)  # the pool manager's and its proxy managers' dict: one place
    return True

"""The HTTP sender: Klime's wire protocol over a keep-alive ``requests.Session``.

One batch per call: ``POST {endpoint}/v1/batch`` with the batch's encoded events, retried
attempt by attempt (the policy of :mod:`._retry`) until the attempts or the caller's
deadline run out, each attempt reported to the caller's feedback hook (which may defer the
batch). The environment ``requests`` reads (proxies, CA bundle) is read once per session;
a plain-http loopback endpoint never goes through a proxy.

Each attempt is bounded in wall-clock time, headers and body included, by the least of its
budget (connect + read timeout) and the caller's deadline; at most a small prefix of each
answer is read, never inflated past a cap; server text quoted in errors has the write key
masked. ``requests``/``urllib3`` are imported on the first send, not before.

May import: the model, the sender interface, :mod:`._http_wire` (which alone imports
``requests``/``urllib3``, lazily).
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any, Dict, Optional, Sequence, Tuple

from .._batching import batch_body
from .._config import (
    BATCH_PATH,
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_MAX_CONCURRENT_REQUESTS,
    DEFAULT_READ_TIMEOUT_S,
    DEFAULT_RETRY_INITIAL_DELAY_MS,
    DEFAULT_RETRY_MAX_ATTEMPTS,
)
from .._deadline import Deadline
from .._logging import log as logger
from .._models import BatchResponse
from .._version import __version__
from ..errors import ConfigurationError, SendError, mask_secret
from ._http_wire import (
    ANSWER_BYTES_PER_EVENT,
    MAX_ANSWER_BYTES,
    Attempt,
    describe_exception,
    header_safe,
    is_stale_connection,
    new_session,
    parse_json,
    permanent_request_errors,
    quote_answer,
    read_answer,
    short,
    validate_endpoint,
)
from ._retry import RetryPolicy
from .base import ATTEMPT_OK, ATTEMPT_REJECTED, ATTEMPT_TRANSIENT, Feedback, Sender, SendResult

if TYPE_CHECKING:
    import requests

__all__ = ["HttpSender", "validate_endpoint"]


USER_AGENT = f"klime-python/{__version__}"

_monotonic = time.monotonic


class HttpSender(Sender):
    """POSTs batches to ``{endpoint}/v1/batch``, retrying transient failures.

    Thread-safe: one ``requests.Session`` (a keep-alive connection pool of ``pool_size``)
    serves every thread; in a forked child :meth:`after_fork` replaces it, so a child never
    writes to its parent's sockets. Retries are driven here attempt by attempt (see
    :class:`~klime.senders._retry.RetryPolicy`) and stop at the caller's deadline.
    """

    def __init__(
        self,
        write_key: str,
        endpoint: str,
        *,
        retry_max_attempts: int = DEFAULT_RETRY_MAX_ATTEMPTS,
        retry_initial_delay: float = DEFAULT_RETRY_INITIAL_DELAY_MS,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
        read_timeout: float = DEFAULT_READ_TIMEOUT_S,
        pool_size: int = DEFAULT_MAX_CONCURRENT_REQUESTS,
        allow_insecure_endpoint: bool = False,
        retry_policy: Optional[RetryPolicy] = None,
    ) -> None:
        """``retry_initial_delay`` is in milliseconds (Ruby SDK parity); timeouts in seconds."""
        if not isinstance(write_key, str) or not write_key:
            raise ConfigurationError("write_key is required")
        if not header_safe(write_key):
            raise ConfigurationError(
                "write_key contains characters that cannot be sent in an HTTP header "
                "(a line break, a control character or a non-Latin-1 letter); check how it was read"
            )
        self._endpoint = validate_endpoint(endpoint, allow_insecure=allow_insecure_endpoint)
        self.url = self._endpoint + BATCH_PATH
        self.retry = retry_policy or RetryPolicy(retry_max_attempts, retry_initial_delay / 1000.0)
        self.connect_timeout = float(connect_timeout)
        self.read_timeout = float(read_timeout)
        self._pool_size = max(1, int(pool_size))
        self._headers = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            "Accept-Encoding": "identity",  # an answer is never inflated (see read_answer)
            "Authorization": f"Bearer {write_key}",
            "User-Agent": USER_AGENT,
        }
        self._secret = write_key  # masked in any server text quoted back
        self._lock = threading.Lock()
        self._state: Optional[Tuple[requests.Session, requests.PreparedRequest, Dict[str, Any]]] = None

    def __repr__(self) -> str:  # never shows the write key
        return f"HttpSender(url={self.url!r})"

    @property
    def session(self) -> requests.Session:
        """The shared session, created on first use."""
        return self._prepared()[0]

    def _prepared(self) -> Tuple[requests.Session, requests.PreparedRequest, Dict[str, Any]]:
        """The session, a prepared request to copy for each batch, and the settings
        ``requests`` would read from the environment for our URL on every request (proxy
        variables, ``REQUESTS_CA_BUNDLE``): read once (see :func:`._http_wire.new_session`).
        Measured: the per-request look-ups (the whole of ``os.environ``, twice, and
        ``~/.netrc``) were a fifth of the CPU time of a request. Thread-safe; created on
        first use, which is when ``requests`` is imported."""
        state = self._state
        if state is None:
            with self._lock:
                state = self._state
                if state is None:
                    state = new_session(self.url, self._headers, self._pool_size)
                    self._state = state
        return state

    def prepare(self) -> None:
        """Initialise OpenSSL (``import ssl, hashlib``: a few milliseconds) on the calling
        thread; ``requests`` itself is imported at the first send, by whichever thread
        sends (a sender thread, off the caller's path). Transports of long-running
        processes call it when the client is made: OpenSSL initialised for the first time
        from a sender thread of a forked uWSGI worker was seen to crash the worker
        (``--lazy-apps --shared-import klime``). Blocks briefly; idempotent; thread-safe."""
        import hashlib  # noqa: F401  (OpenSSL's digests)
        import ssl  # noqa: F401  (OpenSSL itself)

    def after_fork(self) -> None:
        # The inherited sockets belong to the parent: forget them without closing them.
        self._lock = threading.Lock()
        self._state = None

    def close(self) -> None:
        with self._lock:
            state, self._state = self._state, None
        if state is not None:
            state[0].close()

    # ---------------------------------------------------------------------------------

    def send(self, events: Sequence[bytes], deadline: Deadline) -> SendResult:
        """POST one batch, retrying transient failures until attempts or deadline run out.

        Blocks; thread-safe; never raises. Every retry sends the same bytes.
        """
        return self.send_attempts(events, deadline)

    def send_attempts(
        self,
        events: Sequence[bytes],
        deadline: Deadline,
        *,
        feedback: Optional[Feedback] = None,
        attempts_made: int = 0,
    ) -> SendResult:
        """:meth:`send`, telling ``feedback`` the outcome and duration of every attempt.

        After a transient failure a False answer from ``feedback`` ends the call with the
        batch deferred (not retried now, not counted as failed). ``attempts_made`` earlier
        attempts of this batch count against ``retry_max_attempts``. Blocks; thread-safe;
        never raises. Each attempt ends by the least of ``connect_timeout + read_timeout``
        and ``deadline``, in wall-clock time, whatever the server does; one the deadline
        cut short ends the call with ``deadline_reached``.
        """
        from requests.exceptions import RequestException  # imported by now: see _prepared

        body = batch_body(events)
        count = len(events)
        policy = self.retry
        made = max(0, int(attempts_made))  # attempts of this batch, earlier calls included
        first = made
        stale_retry_used = False
        all_failed = tuple(range(count))
        session, template, settings = self._prepared()
        permanent = permanent_request_errors()
        budget = self.connect_timeout + self.read_timeout
        while True:
            connect_t = deadline.cap(self.connect_timeout)
            read_t = deadline.cap(self.read_timeout)
            if connect_t <= 0 or read_t <= 0:
                return self._gave_up(
                    "deadline reached before the batch could be sent",
                    None,
                    all_failed,
                    made - first,
                    first,
                    deadline_reached=True,
                )
            started = _monotonic()
            try:
                request = template.copy()
                request.prepare_body(body, None)
                with Attempt(budget, deadline):
                    response = session.send(
                        request, timeout=(connect_t, read_t), allow_redirects=False, **settings
                    )
                    code = response.status_code
                    wanted = MAX_ANSWER_BYTES + (ANSWER_BYTES_PER_EVENT * count if 200 <= code < 300 else 0)
                    answer = read_answer(response, wanted)
                encoding = response.headers.get("Content-Encoding") or ""
            except permanent as exc:
                reason = f"request could not be made: {type(exc).__name__}"
                logger.error("klime: batch of %d events not sent: %s", count, reason)
                _tell(feedback, ATTEMPT_REJECTED, _monotonic() - started)
                return SendResult(None, SendError(reason), all_failed, made - first, _retries(made, first))
            except RequestException as exc:
                made += 1
                took = _monotonic() - started
                status: Optional[int] = None
                reason = describe_exception(exc)
                wait: Optional[float] = None
                if _out_of_time(deadline):  # the deadline, not the server, ended the attempt
                    _tell(feedback, ATTEMPT_TRANSIENT, took)
                    return self._gave_up(
                        f"deadline reached during attempt {made}: {reason}",
                        None,
                        all_failed,
                        made - first,
                        first,
                        deadline_reached=True,
                    )
                if is_stale_connection(exc) and not stale_retry_used:
                    # the peer closed a pooled connection (a Lambda freeze, an idle timeout):
                    # not a sign of load; retried at once
                    stale_retry_used = True
                    wait = 0.0
                elif not _tell(feedback, ATTEMPT_TRANSIENT, took) and made < policy.max_attempts:
                    return self._deferred(reason, None, all_failed, made, first)
            else:
                made += 1
                took = _monotonic() - started
                status = code
                if 200 <= code < 300:
                    _tell(feedback, ATTEMPT_OK, took)
                    payload = parse_json(answer, encoding, wanted)
                    return self._accepted(payload, code, count, made - first, _retries(made, first))
                text = quote_answer(answer, encoding, self._secret)
                reason = f"HTTP {status}" + (f": {text}" if text else "")
                if status == 413:
                    _tell(feedback, ATTEMPT_REJECTED, took)
                    return SendResult(
                        None,
                        SendError(f"batch rejected as too large ({reason})", status),
                        all_failed,
                        made - first,
                        _retries(made, first),
                        too_large=True,
                    )
                if not policy.is_transient_status(code):
                    _tell(feedback, ATTEMPT_REJECTED, took)
                    logger.error("klime: batch of %d events rejected: %s", count, reason)
                    return SendResult(
                        None,
                        SendError(f"batch rejected: {reason}", status),
                        all_failed,
                        made - first,
                        _retries(made, first),
                    )
                wait = policy.retry_after(response.headers.get("Retry-After"))
                if not _tell(feedback, ATTEMPT_TRANSIENT, took) and made < policy.max_attempts:
                    return self._deferred(reason, status, all_failed, made, first)
            if made >= policy.max_attempts:
                return self._gave_up(
                    f"gave up after {made} attempts: {reason}", status, all_failed, made - first, first
                )
            if wait is None:
                wait = policy.backoff(made - (1 if stale_retry_used else 0))
            left = deadline.remaining()
            if left is not None and wait >= left:
                return self._gave_up(
                    f"deadline reached while retrying ({made} attempts): {reason}",
                    status,
                    all_failed,
                    made - first,
                    first,
                    deadline_reached=True,
                )
            logger.debug("klime: retrying a batch in %.2fs after %s", wait, reason)
            if wait and not deadline.sleep(wait):
                return self._gave_up(
                    f"deadline reached while retrying ({made} attempts): {reason}",
                    status,
                    all_failed,
                    made - first,
                    first,
                    deadline_reached=True,
                )

    @staticmethod
    def _deferred(
        reason: str, status: Optional[int], failed: Tuple[int, ...], made: int, first: int
    ) -> SendResult:
        logger.debug("klime: batch deferred after %d attempts: %s", made, reason)
        return SendResult(
            None,
            SendError(f"not sent yet ({made} attempts so far): {reason}", status, retryable=True),
            failed,
            made - first,
            _retries(made, first),
            deferred=True,
        )

    @staticmethod
    def _gave_up(
        message: str,
        status: Optional[int],
        failed: Tuple[int, ...],
        made_now: int,
        first: int,
        *,
        deadline_reached: bool = False,
    ) -> SendResult:
        if not deadline_reached:
            logger.warning("klime: %s", message)
        return SendResult(
            None,
            SendError(message, status, retryable=True),
            failed,
            made_now,
            _retries(first + made_now, first),
            deadline_reached=deadline_reached,
        )

    def _accepted(self, payload: Any, status: int, count: int, made: int, retries: int) -> SendResult:
        """A 2xx: all accepted, unless the body (parsed JSON, or None) names rejected events."""
        try:
            parsed = BatchResponse.from_body(payload, count, status)
        except (ValueError, TypeError, RecursionError):  # no usable body: the status decides
            parsed = BatchResponse.from_body(None, count, status)
        if not parsed.failed:
            return SendResult(parsed, None, (), made, retries)
        failed = tuple(sorted({e.index for e in parsed.errors}))
        secret = self._secret
        summary = "; ".join(
            f"#{e.index}: {short(mask_secret(e.message, secret))}"
            + (f" ({short(mask_secret(e.code, secret), 40)})" if e.code else "")
            for e in parsed.errors[:5]
        )
        if len(parsed.errors) > 5:
            summary += f"; and {len(parsed.errors) - 5} more"
        logger.warning("klime: %d of %d events of a batch were rejected: %s", parsed.failed, count, summary)
        error = SendError(f"{parsed.failed} of {count} events rejected: {summary}", status, response=parsed)
        return SendResult(parsed, error, failed, made, retries)


def _retries(made: int, first: int) -> int:
    """Attempts made in this call that repeated an earlier attempt of the batch."""
    return max(0, made - max(first, 1))


def _out_of_time(deadline: Deadline) -> bool:
    """The caller's deadline has passed (a time-out ending then was the deadline's doing)."""
    left = deadline.remaining()
    return left is not None and left < 0.001


def _tell(feedback: Optional[Feedback], outcome: str, seconds: float) -> bool:
    """Report one attempt; True means "go on retrying". A hook that raises is ignored."""
    if feedback is None:
        return True
    try:
        return bool(feedback(outcome, seconds))
    except Exception:
        logger.exception("klime: a send feedback hook raised; ignored")
        return True

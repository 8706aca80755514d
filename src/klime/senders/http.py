"""The HTTP sender: Klime's wire protocol over a keep-alive ``requests.Session``."""

from __future__ import annotations

import ipaddress
import json
import threading
import time
from typing import Any, Dict, Optional, Sequence, Tuple
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter

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
from ..errors import ConfigurationError, SendError, quote_body
from ._retry import RetryPolicy
from .base import ATTEMPT_OK, ATTEMPT_REJECTED, ATTEMPT_TRANSIENT, Feedback, Sender, SendResult

__all__ = ["HttpSender", "validate_endpoint"]


USER_AGENT = f"klime-python/{__version__}"

_monotonic = time.monotonic


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def validate_endpoint(endpoint: str, *, allow_insecure: bool = False) -> str:
    """Check ``endpoint`` and return it without a trailing slash.

    ``https://`` is required, except for a loopback host (``localhost``, ``127.0.0.0/8``,
    ``::1``) or when ``allow_insecure`` is True. Raises ConfigurationError.
    """
    if not isinstance(endpoint, str) or not endpoint.strip():
        raise ConfigurationError("endpoint must be a non-empty URL string")
    endpoint = endpoint.strip().rstrip("/")
    try:
        parts = urlsplit(endpoint)
        host = parts.hostname
        _ = parts.port  # raises ValueError on a bad port
    except ValueError as exc:
        raise ConfigurationError(f"endpoint is not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not host:
        raise ConfigurationError("endpoint must be an http(s) URL with a host, such as https://i.klime.com")
    if parts.username or parts.password:
        raise ConfigurationError("endpoint must not carry credentials; pass write_key instead")
    if parts.query or parts.fragment:
        raise ConfigurationError("endpoint must not have a query or fragment")
    if parts.scheme == "http" and not (allow_insecure or _is_loopback(host)):
        raise ConfigurationError(
            "endpoint uses plain http:// for a non-loopback host; the write key would travel "
            "unencrypted. Use https://, or pass allow_insecure_endpoint=True to accept the risk"
        )
    return endpoint


def _header_safe(value: str) -> bool:
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return not any(ord(c) < 0x20 or ord(c) == 0x7F for c in value)


#: Request errors that no retry can fix.
_PERMANENT_REQUEST_ERRORS = (
    requests.exceptions.InvalidHeader,
    requests.exceptions.InvalidURL,
    requests.exceptions.InvalidSchema,
    requests.exceptions.MissingSchema,
)


def _is_stale_connection(exc: BaseException) -> bool:
    """A pooled connection the peer closed (e.g. during a Lambda freeze): retry at once."""
    if isinstance(exc, (requests.exceptions.ConnectTimeout, requests.exceptions.ReadTimeout)):
        return False
    if not isinstance(exc, requests.exceptions.ConnectionError):
        return False
    text = repr(exc)
    return "Connection aborted" in text or "RemoteDisconnected" in text or "ConnectionResetError" in text


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
        if not _header_safe(write_key):
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
            "Authorization": f"Bearer {write_key}",
            "User-Agent": USER_AGENT,
        }
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
        variables, ``REQUESTS_CA_BUNDLE``): read once, here. Measured: the per-request
        look-ups (the whole of ``os.environ``, twice, and ``~/.netrc``) were a fifth of the
        CPU time of a request. Thread-safe; created on first use."""
        state = self._state
        if state is None:
            with self._lock:
                state = self._state
                if state is None:
                    session = requests.Session()
                    adapter = HTTPAdapter(pool_connections=1, pool_maxsize=self._pool_size, max_retries=0)
                    session.mount("https://", adapter)
                    session.mount("http://", adapter)
                    session.verify = True
                    settings: Dict[str, Any] = dict(
                        session.merge_environment_settings(self.url, {}, None, None, None)
                    )
                    session.trust_env = False  # read once above; not again per request
                    template = session.prepare_request(
                        requests.Request("POST", self.url, headers=self._headers)
                    )
                    state = (session, template, settings)
                    self._state = state
        return state

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
        never raises.
        """
        body = batch_body(events)
        count = len(events)
        policy = self.retry
        made = max(0, int(attempts_made))  # attempts of this batch, earlier calls included
        first = made
        stale_retry_used = False
        all_failed = tuple(range(count))
        session, template, settings = self._prepared()
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
                response = session.send(
                    request, timeout=(connect_t, read_t), allow_redirects=False, **settings
                )
            except _PERMANENT_REQUEST_ERRORS as exc:
                reason = f"request could not be made: {type(exc).__name__}"
                logger.error("klime: batch of %d events not sent: %s", count, reason)
                _tell(feedback, ATTEMPT_REJECTED, _monotonic() - started)
                return SendResult(
                    None, SendError(reason), all_failed, made - first, _retries(made, first)
                )
            except requests.exceptions.RequestException as exc:
                made += 1
                took = _monotonic() - started
                status: Optional[int] = None
                reason = _describe_exception(exc)
                wait: Optional[float] = None
                if _is_stale_connection(exc) and not stale_retry_used:
                    # the peer closed a pooled connection (a Lambda freeze, an idle timeout):
                    # not a sign of load; retried at once
                    stale_retry_used = True
                    wait = 0.0
                elif not _tell(feedback, ATTEMPT_TRANSIENT, took) and made < policy.max_attempts:
                    return self._deferred(reason, None, all_failed, made, first)
            else:
                made += 1
                took = _monotonic() - started
                status = response.status_code
                if 200 <= status < 300:
                    _tell(feedback, ATTEMPT_OK, took)
                    return self._accepted(response, count, made - first, _retries(made, first))
                text = _read_text(response)
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
                if not policy.is_transient_status(status):
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

    @staticmethod
    def _accepted(response: requests.Response, count: int, made: int, retries: int) -> SendResult:
        payload: Any
        try:
            payload = json.loads(response.content) if response.content else None
        except ValueError:
            payload = None
        parsed = BatchResponse.from_body(payload, count, response.status_code)
        if not parsed.failed:
            return SendResult(parsed, None, (), made, retries)
        failed = tuple(sorted({e.index for e in parsed.errors}))
        summary = "; ".join(
            f"#{e.index}: {_short(e.message)}" + (f" ({_short(e.code, 40)})" if e.code else "")
            for e in parsed.errors[:5]
        )
        if len(parsed.errors) > 5:
            summary += f"; and {len(parsed.errors) - 5} more"
        logger.warning("klime: %d of %d events of a batch were rejected: %s", parsed.failed, count, summary)
        error = SendError(
            f"{parsed.failed} of {count} events rejected: {summary}",
            response.status_code,
            response=parsed,
        )
        return SendResult(parsed, error, failed, made, retries)


def _retries(made: int, first: int) -> int:
    """Attempts made in this call that repeated an earlier attempt of the batch."""
    return max(0, made - max(first, 1))


def _tell(feedback: Optional[Feedback], outcome: str, seconds: float) -> bool:
    """Report one attempt; True means "go on retrying". A hook that raises is ignored."""
    if feedback is None:
        return True
    try:
        return bool(feedback(outcome, seconds))
    except Exception:
        logger.exception("klime: a send feedback hook raised; ignored")
        return True


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_text(response: requests.Response) -> str:
    try:
        body = response.content
    except Exception:  # a body that breaks while being read: the status says enough
        return ""
    text = quote_body(body)
    try:
        payload = json.loads(body)
    except ValueError:
        return text
    if isinstance(payload, dict) and isinstance(payload.get("message"), str):
        return quote_body(payload["message"])
    return text


def _describe_exception(exc: BaseException) -> str:
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return "connection timed out"
    if isinstance(exc, requests.exceptions.ReadTimeout):
        return "read timed out"
    if isinstance(exc, requests.exceptions.SSLError):
        return "TLS error"
    if isinstance(exc, requests.exceptions.ConnectionError):
        text = str(exc)
        if "Connection refused" in text:
            return "connection refused"
        if "Connection aborted" in text or "reset" in text.lower():
            return "connection reset"
        return "connection error"
    return type(exc).__name__

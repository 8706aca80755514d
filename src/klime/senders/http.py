"""The HTTP sender: Klime's wire protocol over a keep-alive ``requests.Session``.

One request per :meth:`HttpSender.attempt`: ``POST {endpoint}/v1/batch`` with the batch's
encoded events, its outcome described in an :class:`~klime.senders.base.Attempt` value; the
retries are klime's one loop (:func:`~klime.senders.base.send_with_retries`, the policy of
:mod:`klime._retry`), which :meth:`HttpSender.send` runs. The environment ``requests``
reads (proxies, CA bundle) is read once per session;
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
from .._retry import RetryPolicy
from .._version import __version__
from ..errors import ConfigurationError, SendError, mask_secret
from ._http_wire import (
    ANSWER_BYTES_PER_EVENT,
    MAX_ANSWER_BYTES,
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
from ._http_wire import (
    Attempt as AttemptTimer,
)
from .base import OK, PARTIAL, REFUSED, RETRY, TOO_LARGE, Attempt, Sender, SendResult, send_with_retries

if TYPE_CHECKING:
    import requests

__all__ = ["HttpSender"]


USER_AGENT = f"klime-python/{__version__}"

_monotonic = time.monotonic


class HttpSender(Sender):
    """POSTs batches to ``{endpoint}/v1/batch``, retrying transient failures.

    Thread-safe: one ``requests.Session`` (a keep-alive connection pool of ``pool_size``)
    serves every thread; in a forked child :meth:`after_fork` replaces it, so a child never
    writes to its parent's sockets. :meth:`attempt` makes one request; :meth:`send` retries
    (see :class:`~klime._retry.RetryPolicy`) and stops at the caller's deadline.
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
        self.retry_policy = self.retry
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
        """POST one batch, retrying transient failures until attempts or deadline run out
        (klime's one retry loop, :func:`~klime.senders.base.send_with_retries`, over
        :meth:`attempt`). Blocks; thread-safe; never raises. Every retry sends the same bytes.
        """
        return send_with_retries(self, events, deadline)

    def attempt(self, events: Sequence[bytes], deadline: Deadline) -> Attempt:
        """POST one batch once and describe the outcome. Never retries; never raises.

        Blocks for one request: it ends by the least of ``connect_timeout + read_timeout``
        and ``deadline``, in wall-clock time, whatever the server does (``cut_short`` when
        the deadline ended it). Thread-safe.
        """
        from requests.exceptions import RequestException  # imported by now: see _prepared

        count = len(events)
        all_failed = tuple(range(count))
        session, template, settings = self._prepared()
        connect_t = deadline.cap(self.connect_timeout)
        read_t = deadline.cap(self.read_timeout)
        started = _monotonic()
        if connect_t <= 0 or read_t <= 0:
            return Attempt(RETRY, reason="deadline reached", cut_short=True, made=False)
        try:
            request = template.copy()
            request.prepare_body(batch_body(events), None)
            with AttemptTimer(self.connect_timeout + self.read_timeout, deadline):
                response = session.send(
                    request, timeout=(connect_t, read_t), allow_redirects=False, **settings
                )
                code = response.status_code
                wanted = MAX_ANSWER_BYTES + (ANSWER_BYTES_PER_EVENT * count if 200 <= code < 300 else 0)
                answer = read_answer(response, wanted)
            encoding = response.headers.get("Content-Encoding") or ""
        except permanent_request_errors() as exc:
            reason = f"request could not be made: {type(exc).__name__}"
            logger.error("klime: batch of %d events not sent: %s", count, reason)
            return Attempt(REFUSED, error=SendError(reason), failed=all_failed, made=False,
                           duration=_monotonic() - started)
        except RequestException as exc:
            took = _monotonic() - started
            cut_short = _out_of_time(deadline)
            return Attempt(
                RETRY,
                reason=describe_exception(exc),
                stale=not cut_short and is_stale_connection(exc),
                cut_short=cut_short,
                duration=took,
            )
        took = _monotonic() - started
        if 200 <= code < 300:
            payload = parse_json(answer, encoding, wanted)
            return self._accepted(payload, code, count, took)
        text = quote_answer(answer, encoding, self._secret)
        reason = f"HTTP {code}" + (f": {text}" if text else "")
        if code == 413:
            error = SendError(f"batch rejected as too large ({reason})", code)
            return Attempt(
                TOO_LARGE, status=code, error=error, failed=all_failed, reason=reason, duration=took
            )
        if not self.retry.is_transient_status(code):
            logger.error("klime: batch of %d events rejected: %s", count, reason)
            error = SendError(f"batch rejected: {reason}", code)
            return Attempt(REFUSED, status=code, error=error, failed=all_failed, reason=reason, duration=took)
        retry_after = self.retry.retry_after(response.headers.get("Retry-After"))
        return Attempt(RETRY, status=code, reason=reason, retry_after=retry_after, duration=took)

    def _accepted(self, payload: Any, status: int, count: int, took: float) -> Attempt:
        """A 2xx: all accepted, unless the body (parsed JSON, or None) names rejected events."""
        try:
            parsed = BatchResponse.from_body(payload, count, status)
        except (ValueError, TypeError, RecursionError):  # no usable body: the status decides
            parsed = BatchResponse.from_body(None, count, status)
        if not parsed.failed:
            return Attempt(OK, status=status, response=parsed, duration=took)
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
        return Attempt(PARTIAL, status=status, response=parsed, error=error, failed=failed, duration=took)


def _out_of_time(deadline: Deadline) -> bool:
    """The caller's deadline has passed (a time-out ending then was the deadline's doing)."""
    left = deadline.remaining()
    return left is not None and left < 0.001

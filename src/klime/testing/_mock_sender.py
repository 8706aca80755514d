"""An in-memory stand-in for Klime's API: :class:`MockSender`, in the shape of httpx's
``MockTransport``. A function of yours answers each request; klime's real pipeline does
the rest (the transport's queue and threads, the retry loop with its backoff and the
server's ``Retry-After``, 413 halving, ``on_error``/``on_success``, the ledger), and the
answer is read by the very code that reads a real server's
(:func:`klime.senders.http.answer_outcome`). No socket, no port.

May import: the senders (their base; the HTTP sender's reading of an answer at the first
request, so that importing klime.testing stays light), the model, the standard library.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

from .._batching import batch_body
from .._config import DEFAULT_RETRY_INITIAL_DELAY_MS, DEFAULT_RETRY_MAX_ATTEMPTS
from .._deadline import Deadline
from .._retry import RetryPolicy
from ..senders.base import RETRY, Attempt, Sender, SendResult, send_with_retries

__all__ = ["MockRequest", "MockResponse", "MockSender"]


@dataclass(frozen=True)
class MockRequest:
    """One request the pipeline made: ``body`` is exactly what the HTTP sender would POST
    to ``/v1/batch`` (``{"batch":[...]}``); ``number`` counts this sender's requests from 1
    (a retry is a new request, with the same bytes)."""

    body: bytes
    number: int

    @property
    def events(self) -> List[Dict[str, Any]]:
        """The batch's events as wire dicts (camelCase: ``type``, ``event``, ``userId``,
        ``messageId``...)."""
        events: List[Dict[str, Any]] = json.loads(self.body)["batch"]
        return events


@dataclass(frozen=True)
class MockResponse:
    """What the API answers: ``status``, a JSON ``body`` (None: Klime's usual answer for
    a 2xx, nothing otherwise), a ``Retry-After`` header value (``"2"``, or an HTTP date),
    and ``delay`` seconds to take before answering (cut short by the caller's deadline,
    as a slow server's answer is)."""

    status: int = 200
    body: Any = None
    retry_after: Optional[str] = None
    delay: float = 0.0


#: What a handler may return: a response, a bare status, or None for "200, all accepted".
Answer = Union[MockResponse, int, None]


def _accept_all(request: MockRequest) -> Answer:
    return None


class MockSender(Sender):
    """A sender whose "server" is ``handler``, a function of one :class:`MockRequest`
    returning a :class:`MockResponse`, a status (``503``) or None (200, all accepted). A
    handler that raises :class:`OSError` (``ConnectionResetError``, ``TimeoutError``...)
    is a network failure, retried like one.

    ``retry_max_attempts`` and ``retry_initial_delay`` (milliseconds) are the HTTP
    sender's options, with the same defaults; pass a small delay to keep tests fast.
    Every request is kept in :attr:`requests`. The handler may be called from several
    sender threads at once. Thread-safe; :meth:`attempt` blocks only for a response's
    ``delay``.
    """

    def __init__(
        self,
        handler: Optional[Callable[[MockRequest], Answer]] = None,
        *,
        retry_max_attempts: int = DEFAULT_RETRY_MAX_ATTEMPTS,
        retry_initial_delay: float = DEFAULT_RETRY_INITIAL_DELAY_MS,
    ) -> None:
        self.handler = handler if handler is not None else _accept_all
        self.policy = RetryPolicy(retry_max_attempts, max(0.0, float(retry_initial_delay)) / 1000.0)
        self.retry_policy = self.policy
        self._lock = threading.Lock()
        self._requests: List[MockRequest] = []

    def __repr__(self) -> str:
        return f"MockSender(handler={getattr(self.handler, '__name__', self.handler)!r})"

    @property
    def requests(self) -> List[MockRequest]:
        """A copy of every request made so far, in the order they were made."""
        with self._lock:
            return list(self._requests)

    @property
    def events(self) -> List[Dict[str, Any]]:
        """The events of every request made so far, as wire dicts (retried ones as often as
        they were sent)."""
        return [event for request in self.requests for event in request.events]

    def send(self, events: Sequence[bytes], deadline: Deadline) -> SendResult:
        """Deliver one batch through klime's retry loop. Blocks; never raises."""
        return send_with_retries(self, events, deadline)

    def attempt(self, events: Sequence[bytes], deadline: Deadline) -> Attempt:
        """One request: ask the handler, read its answer as a real server's is read.
        Blocks for the response's ``delay`` (at most until ``deadline``)."""
        if deadline.expired():
            return Attempt(RETRY, reason="deadline reached", cut_short=True, made=False)
        started, cpu_started = time.monotonic(), time.thread_time()
        body = batch_body(events)
        with self._lock:
            request = MockRequest(body, len(self._requests) + 1)
            self._requests.append(request)
        try:
            answer = self.handler(request)
        except OSError as exc:  # the network's failure, as the HTTP sender sees one
            return Attempt(RETRY, reason=f"connection error ({type(exc).__name__})",
                           duration=time.monotonic() - started)
        if not isinstance(answer, MockResponse):
            answer = MockResponse(200 if answer is None else answer)
        response = answer
        if response.delay > 0 and not deadline.sleep(response.delay):
            took = time.monotonic() - started
            return Attempt(RETRY, reason="read timed out", cut_short=True, duration=took)
        from ..senders.http import ANSWER_BYTES_PER_EVENT, MAX_ANSWER_BYTES, answer_outcome

        count = len(events)
        payload = response.body
        if payload is None and 200 <= response.status < 300:
            payload = {"status": "ok", "accepted": count, "failed": 0}
        raw = b"" if payload is None else json.dumps(payload).encode()
        return answer_outcome(
            response.status,
            raw,
            encoding="",
            retry_after=response.retry_after,
            count=count,
            limit=MAX_ANSWER_BYTES + ANSWER_BYTES_PER_EVENT * count,
            policy=self.policy,
            secret="",
            took=time.monotonic() - started,
            cpu=time.thread_time() - cpu_started,
        )

